"""What a run reports: metrics.jsonl and trackers, the loss plot, the model card, training_summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypedDict

from convert.figures import new_figure, save_figure
from convert.formatting import duration, human_bytes, human_count
from convert.text.span_corruption import SpanCorruption


class Summary(TypedDict):
    """training_summary.json: what a finished run did (the keys are a stable format)."""

    model_dir: str
    settings: dict[str, Any]
    run: dict[str, Any]  # the settings that decide the trajectory (see checkpointing.fingerprint)
    data: str
    validation: str | None
    steps: int  # the steps done: the planned ones, or fewer where max_seconds stopped the run
    planned_steps: int
    stopped_early: bool  # max_seconds stopped the run before its planned steps
    global_batch: int
    warmup_steps: int
    tokens: int
    compute_fraction: float | None
    num_processes: int
    total_params: int
    trainable_params: int
    teacher_params: int
    flops_estimate: float
    memory_estimate: dict[str, Any]  # bytes per process by part (convert.uptrain.memory.MemoryEstimate)
    peak_memory_mib: float | None  # the main process's measured peak: RSS on CPU, max allocated on CUDA
    train_seconds: float
    tokens_per_s: float
    final_train_loss: float | None
    initial_eval: dict | None
    final_eval: dict | None
    resumed_from: str | None
    last_checkpoint: str | None
    data_sources: list[dict]  # per training source: name, weight, tokens drawn over the run, token cache (in memory)
    data_wait_fraction: float | None  # of the step time (from the second step on), spent waiting for data


def read_rows(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line torn by a kill in the middle of its write is left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class Metrics:
    """metrics.jsonl (main process; flushed every row) and accelerate's trackers."""

    def __init__(self, accelerator, path: Path, resume_step: int | None):
        self.accelerator, self.path, self.rows = accelerator, path, []
        if accelerator.is_main_process:
            if resume_step is not None and path.is_file():  # drop what ran after the checkpoint
                self.rows = [r for r in read_rows(path) if r["step"] <= resume_step]
            tmp = path.with_name(f".tmp-{path.name}")  # replaced whole: a kill never leaves a half history
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            os.replace(tmp, path)

    def log(self, row: dict) -> None:
        scalars = {f"{row['kind']}/{k}": v for k, v in row.items() if isinstance(v, float)}
        self.accelerator.log(scalars, step=row["step"])
        if self.accelerator.is_main_process:
            self.rows.append(row)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]


def plot_losses(rows: list[dict], path: Path) -> None:
    """Train and validation loss against tokens."""
    train = [(r["tokens"], r["loss"]) for r in rows if r["kind"] == "train"]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = new_figure(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def model_card(source_dir: str, summary: Summary) -> str:
    """The input checkpoint's card (or a new one) with an uptraining section appended."""
    src = Path(source_dir) / "README.md"
    card = (
        src.read_text()
        if src.is_file()
        else (
            "---\nlibrary_name: transformers\ntags:\n- gqa-convert\n- uptrained\n---\n\n"
            f"# {Path(summary['settings']['output_dir']).name}\n\nConverted with gqa-convert, then uptrained.\n"
        )
    )
    s, first, last = summary["settings"], summary["initial_eval"], summary["final_eval"]
    alpha = (
        f"{summary['compute_fraction']:.3g} of {human_count(s['pretraining_tokens'])} pretraining tokens"
        if summary["compute_fraction"] is not None
        else "n/a (pretraining_tokens not given)"
    )
    teacher = (
        f"{s['teacher']} (KL weight {s['kd_weight']}, temperature {s['kd_temperature']})" if s["teacher"] else "none"
    )
    scope = s["train"] + (
        f" (LoRA r={s['lora_r']} on {', '.join(s['lora_modules'])}; {', '.join(s['kv_modules'])} trained fully; merged)"
        if s["train"] == "lora"
        else ""
    )
    rows = [
        ("input checkpoint", s["model"]),
        ("data", summary["data"]),
        (
            "tokens",
            f"{summary['tokens']:,} ({summary['steps']} steps x {summary['global_batch']} blocks x "
            f"{_row_tokens(s)} tokens)",
        ),
        ("compute fraction alpha", alpha),
        ("trained", f"{scope}: {summary['trainable_params']:,} of {summary['total_params']:,} parameters"),
        ("teacher", teacher),
        (
            "optimizer",
            f"AdamW lr {s['lr']}, warmup {summary['warmup_steps']} steps, cosine to "
            f"{s['min_lr_ratio']} x lr, weight decay {s['weight_decay']}, clip {s['max_grad_norm']}",
        ),
        (
            "validation perplexity",
            (f"{first['val_ppl']:.3f} before -> {last['val_ppl']:.3f} after ({summary['validation']})")
            if last
            else "not measured",
        ),
        ("processes", str(summary["num_processes"])),
        ("wall time", duration(summary["train_seconds"])),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return card.rstrip() + "\n\n## Uptraining (gqa-convert)\n\n| | |\n|---|---|\n" + table + "\n"


def _row_tokens(s: dict) -> str:
    """The tokens one row counts: a block, or a span-corruption example's inputs plus targets."""
    if s.get("objective", "causal_lm") == "causal_lm":
        return str(s["block_size"])

    span = SpanCorruption(s["noise_density"], s["mean_span_length"], s["block_size"])
    return f"({span.input_length} inputs + {span.target_length} targets)"


def describe_plan(s, plan: dict, data: dict, sizes: dict, resume: tuple[str, int] | None) -> list[str]:
    """The lines printed before training: data, what trains, budget, compute, and where a resume starts."""
    tokens, alpha = plan["tokens"], plan["alpha"]
    epochs = (
        f"{tokens / data['train_tokens']:.2f} epochs of {human_count(data['train_tokens'])} tokens"
        if data["train_tokens"]
        else "streaming"
    )
    teacher, row = s.teacher is not None, _row_tokens(s.model_dump())
    lines = [
        f"uptrain {s.model} -> {s.output_dir}/model",
        f"  data        {data['train_name']} ({epochs}); validation {data.get('val_name', 'none')}"
        + (f", {len(data['val_blocks'])} blocks" if data["val_blocks"] is not None else ""),
        f"  trained     {s.train}: {sizes['trainable']:,} of {sizes['total']:,} parameters"
        + (f"; teacher {s.teacher} (kd_weight {s.kd_weight}, T {s.kd_temperature})" if teacher else ""),
        f"  budget      {plan['total_steps']} steps x {plan['global_batch']} blocks ({s.micro_batch_size} x "
        f"{s.grad_accum} accum x {plan['num_processes']} proc) x {row} tokens = {tokens:,} tokens"
        + (f" = alpha {alpha:.3g} of {human_count(s.pretraining_tokens)}" if alpha is not None else ""),
        f"  compute     ~{human_count(plan['flops'], 'FLOP')} (6 N D, N = {human_count(sizes['total'])}"
        + (", + 2 N_teacher D" if teacher else "")
        + ")"
        + f"; lr {s.lr}, warmup {plan['warmup_steps']}, cosine to {s.min_lr_ratio} x lr",
    ]
    for src in data.get("source_report", []):
        share = f"weight {src['weight']:.3g}, " if len(data["source_report"]) > 1 else ""
        lines.append(f"  source      {src['name']}: {share}{src['tokens']:,} tokens over the run")
        cache = src.get("cache")
        if cache is None:
            continue
        if cache["hit"]:
            lines.append(f"  cache       hit: {cache['folder']} ({cache['parts']} parts)")
        else:
            here = ", ".join(map(str, cache["tokenized_here"])) or "none"
            where = f"{cache['folder']} (parts {here} of {cache['parts']} by this process)"
            lines.append(f"  cache       miss: tokenized into {where}")
    if data.get("num_workers") is not None:
        lines.append(f"  loader      {data['num_workers']} worker(s) per process preparing batches")
    if resume is not None:
        where, step = resume
        lines.append(f"  resume      from {where} (step {step}, {step * plan['tokens_per_step']:,} tokens)")
    return lines


def describe_memory(m, processes: int, sharded: bool, device: str) -> str:
    """The plan's memory line: the estimate per process, by part."""
    acts = (
        f"activations {human_bytes(m.activations)} ({human_bytes(m.activations_checkpointed)} with "
        f"gradient checkpointing)"
        if not m.gradient_checkpointing
        else f"activations {human_bytes(m.activations_checkpointed)} checkpointed ({human_bytes(m.activations)} "
        f"without)"
    )
    parts = [
        f"weights {human_bytes(m.weights)}",
        f"gradients {human_bytes(m.gradients)}",
        f"optimizer {human_bytes(m.optimizer)}",
        acts,
        f"logits {human_bytes(m.logits)}",
    ]
    if m.teacher:
        parts.append(f"teacher {human_bytes(m.teacher)}")
    if m.baseline:
        parts.append(f"runtime and data {human_bytes(m.baseline)}")
    if m.loading:
        parts.append(f"loading peak {human_bytes(m.loading)}")
    how = f"{'FSDP-sharded' if sharded and processes > 1 else 'replicated'} over {processes} process" + (
        "es" if processes > 1 else ""
    )
    unit = "RSS" if device == "cpu" else f"{device} memory"
    return f"  memory      ~{human_bytes(m.total)} {unit} per process ({how}): " + ", ".join(parts)
