#!/usr/bin/env python
"""Replicate the GQA paper's conversion and uptraining experiments (Ainslie et al. 2023, figures 4 and 5) on a small
llama pretrained from scratch, with this project's own converter and uptraining recipe.

    python bench/replicate_paper.py --out docs/replication           # the full grid (42 min on a shared 2-core CPU)
    python bench/replicate_paper.py --quick --out /tmp/replication   # smoke run: tiny model, 1 G, 2 methods (~1 min)
    python bench/replicate_paper.py --arch t5 --out docs/replication_t5   # the paper's T5.1.1, span corruption

`--arch t5` runs the same steps on a small T5.1.1 trained and scored with span corruption (bench/replication_t5.py):
the pretraining and uptraining budgets count input + target tokens, the score is the held-out span-corruption
perplexity, and the calibrated method calibrates on span-corrupted training text (convert/methods/seq2seq.py).

One command does everything, in order:

 1. tokenizer  a byte-level BPE (4,096 tokens; 1,024 with --quick) trained with `tokenizers` on the training text;
               deterministic, so every run gets the same vocabulary. Nothing is downloaded.
 2. pretrain   a randomly initialised multi-head llama (8 heads of 32 dims, 4 layers, hidden 256), saved with
               save_pretrained, is trained by `convert.uptrain` itself with a token budget on the training text
               (default: WikiText-2 `valid.txt`). The tokens it saw are the pretraining tokens D.
 3. convert    `convert_checkpoint` to G KV heads (MQA = 1, GQA-2, GQA-4) with each method: `mean` (the paper),
               `first`, `random` (the paper's ablations) and `calibrated` (this project's, when registered).
 4. uptrain    `convert.uptrain` again, with the pretraining recipe (warmup + cosine schedule, batch, block
               size, data, optimizer), for alpha x D tokens (`compute_fraction=alpha`), alpha in {0, 1%, 5%, 10%};
               alpha = 0 is the converted model as it is. The peak learning rate is the one pretraining ended at
               (min_lr_ratio x lr), as when the paper continues T5's decaying schedule; re-warming to the
               pretraining peak makes even the unconverted MHA model worse (`--uptrain-lr` changes it). As a
               control, the MHA model itself is trained on for the same budgets: the part of a gain that is
               "more training", not recovery.
 5. evaluate  perplexity on the held-out text (default: WikiText-2 `test.txt`, never trained or calibrated on),
               windows of one block, evenly spaced over the whole file.

Seeds: `--seeds 0,1` runs every cell with the first seed, and the headline cells (`--headline` methods at alpha =
5%) and the alpha = 0 cells of seeded methods (random, calibrated) with every seed. The seed sets the conversion
(random heads, calibration sample) and the uptraining data order. The MHA model is pretrained once
(`--pretrain-seed`), so the spread is that of conversion and uptraining, not of pretraining.

The claims, the table and the figures are computed by bench/replication_analysis.py from results.json alone.
Writes into --out: results.json (everything, with per-cell timings), results.md (the table and the verdict on each
of the paper's claims), fig_methods.png (figure 4's shape: perplexity per conversion method and G, at alpha = 0 and
5%) and fig_alpha.png (figure 5's shape: perplexity against alpha, one panel per G, with the MHA baseline).

Finished cells are kept under --work (one JSON file each, keyed by every setting that changes a number), so an
interrupted run continues where it stopped; `--fresh` ignores them. Converted and uptrained weights are deleted once
scored unless --keep-models. `--quiet` drops progress lines; `--json` prints results.json on stdout (progress goes to
stderr). Exit status 0 when the grid completed, 2 on bad arguments or missing data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from replication_analysis import Config, aggregate, check_claims, g_name, markdown, pct, plot_alpha, plot_methods
from replication_setup import (
    build_parser,
    cell_tag,
    choose_threads,
    default_data,
    default_test,
    hardware,
    make_config,
    provenance,
    train_bpe,
    work_hash,
)
from replication_t5 import init_t5, score_t5, t5_test_examples, train_t5_tokenizer

from convert.eval.perplexity import score_folder
from convert.formatting import duration

EOS = "<|endoftext|>"
SEEDED_METHODS = ("random", "calibrated")  # conversions that depend on the seed


# ============================================================================================== output


class Log:
    def __init__(self, quiet: bool, to_stderr: bool):
        self.quiet, self.stream, self.start = quiet, sys.stderr if to_stderr else sys.stdout, time.time()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{duration(time.time() - self.start):>7}] {message}", file=self.stream, flush=True)


# ============================================================================================== pieces


def train_tokenizer(text_file: Path, vocab_size: int, folder: Path):
    """A byte-level BPE trained on the training text (deterministic), EOS also serving as BOS."""
    return train_bpe(text_file, vocab_size, folder, [EOS], eos_token=EOS, bos_token=EOS)


def init_model(cfg: Config, tokenizer, folder: Path) -> int:
    """A randomly initialised MHA llama saved with save_pretrained beside the tokenizer; returns its parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(cfg.pretrain_seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def test_ids(tokenizer, path: Path, block: int, windows: int) -> tuple[torch.Tensor, dict]:
    """The held-out windows, concatenated: scoring them with window = stride = block scores exactly these windows."""
    from convert.eval.perplexity import tokenize_file

    ids = tokenize_file(tokenizer, str(path))
    total = len(ids) // block
    if total < 1:
        raise SystemExit(f"error: {path} has {len(ids)} tokens, fewer than one block ({block})")
    chosen = list(range(total)) if windows == 0 or windows >= total else [i * total // windows for i in range(windows)]
    picked = torch.cat([ids[i * block : (i + 1) * block] for i in chosen])
    info = {
        "file": str(path),
        "file_tokens": len(ids),
        "window": block,
        "stride": block,
        "windows": len(chosen),
        "windows_in_file": total,
        "tokens_scored": len(chosen) * (block - 1),
    }
    return picked, info


def score(folder: Path, ids: torch.Tensor, block: int) -> dict:
    result = score_folder(folder, ids, window=block, batch_size=8)
    return {"ppl": result.ppl, "nll": result.nll, "scored_tokens": result.tokens}


def train(
    cfg: Config, model: Path, output: Path, data: Path, seed: int, lr: float, budget: dict, quiet: bool = True
) -> dict:
    """One uptraining run (pretraining too), in this process: returns its training summary."""
    from convert.uptrain import Options, make_settings, uptrain

    if output.exists():
        shutil.rmtree(output)  # a half-finished run of an interrupted replication
    settings = make_settings(
        {
            "model": str(model),
            "output_dir": str(output),
            "data": str(data),
            "train": "full",
            "block_size": cfg.block_size,
            "micro_batch_size": cfg.micro_batch_size,
            "grad_accum": 1,
            "seed": seed,
            "lr": lr,
            "warmup_ratio": cfg.warmup_ratio,
            "min_lr_ratio": cfg.min_lr_ratio,
            "weight_decay": cfg.weight_decay,
            "validation_fraction": 0,
            "eval_every": 0,
            "save_every": 0,
            "report_to": "none",
            "model_dtype": "float32",
            **({"objective": "span_corruption", "trust_remote_code": True} if cfg.arch == "t5" else {}),
            **budget,
        }
    )
    return dict(uptrain(settings, Options(quiet=quiet)))


def available_methods(wanted: list[str], arch: str = "llama") -> tuple[list[str], list[str]]:
    """The requested methods that are registered (importing the calibrated one when it exists), and notes."""
    from convert.methods import METHODS

    notes = []
    if "calibrated" in wanted and "calibrated" not in METHODS:
        try:
            import convert.calibrate  # noqa: F401  registers "calibrated"
        except Exception as e:  # missing or broken module: run the rest, say why
            notes.append(
                f"method 'calibrated' left out: convert.calibrate could not be imported ({type(e).__name__}: {e})"
            )
    keep = [m for m in wanted if m in METHODS]
    for m in wanted:
        if m not in METHODS and not any(m in n for n in notes):
            notes.append(f"method {m!r} left out: not registered (known: {', '.join(METHODS)})")
    return keep, notes


# ============================================================================================== the grid


@dataclass
class Cell:
    kind: str  # "mha", "control", "gqa"
    groups: int
    method: str
    alpha: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}-g{self.groups}-{self.method}-a{self.alpha:g}-s{self.seed}"


class Runner:
    def __init__(
        self, cfg: Config, data: Path, test: Path, work: Path, log: Log, fresh: bool, keep_models: bool, quiet: bool
    ):
        self.cfg, self.data, self.test, self.work, self.log = cfg, data, test, work, log
        self.fresh, self.keep_models, self.quiet = fresh, keep_models, quiet
        self.cells_dir = work / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.tag = cell_tag(cfg, test)

    # ------------------------------------------------------------------ cache
    def cached(self, name: str) -> dict | None:
        path = self.cells_dir / f"{name}-{self.tag}.json"
        if self.fresh or not path.is_file():
            return None
        return json.loads(path.read_text())

    def store(self, name: str, row: dict) -> dict:
        tmp = self.cells_dir / f".{name}-{self.tag}.json.tmp"
        tmp.write_text(json.dumps(row, indent=2))
        os.replace(tmp, self.cells_dir / f"{name}-{self.tag}.json")
        return row

    def score(self, folder: Path) -> dict:
        """Test perplexity (llama) or held-out span-corruption perplexity (t5) of a model folder."""
        if self.cfg.arch == "t5":
            return score_t5(folder, self.ids)
        return score(folder, self.ids, self.cfg.block_size)

    # ------------------------------------------------------------------ stages
    def prepare(self) -> dict:
        cfg = self.cfg
        t0 = time.time()
        tok_dir = self.work / "tokenizer"
        if cfg.arch == "t5":
            self.tokenizer = train_t5_tokenizer(self.data, cfg.vocab_size, tok_dir)
            self.ids, self.eval_info = t5_test_examples(self.tokenizer, self.test, cfg.block_size, cfg.eval_windows)
        else:
            self.tokenizer = train_tokenizer(self.data, cfg.vocab_size, tok_dir)
            self.ids, self.eval_info = test_ids(self.tokenizer, self.test, cfg.block_size, cfg.eval_windows)
        from convert.eval.perplexity import tokenize_file

        self.train_tokens = len(tokenize_file(self.tokenizer, str(self.data)))
        self.log(
            f"tokenizer: byte-level BPE, {len(self.tokenizer):,} tokens, trained on {self.data.name} "
            f"({self.train_tokens:,} tokens) in {time.time() - t0:.1f} s; "
            f"test: {self.eval_info['windows']} windows x {cfg.block_size} tokens "
            f"of {self.eval_info['file_tokens']:,}"
        )
        return {"tokenizer_seconds": time.time() - t0}

    def pretrain(self) -> dict:
        """The MHA model (trained once per work folder), with the random init's and its own test scores."""
        cfg = self.cfg
        init, mha = self.work / "init", self.work / "mha" / "model"
        done = self.work / "pretrain.json"
        key = work_hash(cfg, self.data)
        row = json.loads(done.read_text()) if done.is_file() else None
        if (
            not self.fresh
            and row is not None
            and row.get("key") == key
            and (mha / "config.json").is_file()
            and (init / "config.json").is_file()
        ):
            self.reused += 1
            self.log(
                f"pretrain: reused {mha} ({row['tokens']:,} tokens, {duration(row['train_seconds'])} when trained)"
            )
        else:
            for old in (init, self.work / "mha"):
                shutil.rmtree(old, ignore_errors=True)
            done.unlink(missing_ok=True)
            params = (init_t5 if cfg.arch == "t5" else init_model)(cfg, self.tokenizer, init)
            self.log(
                f"pretrain: {cfg.arch} {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
                f"{cfg.head_dim}, {params:,} parameters; training {cfg.pretrain_tokens:,} tokens with "
                f"convert.uptrain ..."
            )
            t1 = time.time()
            summary = train(
                cfg,
                init,
                self.work / "mha",
                self.data,
                cfg.pretrain_seed,
                cfg.lr,
                {"tokens": cfg.pretrain_tokens},
                quiet=self.quiet,
            )
            train_s = time.time() - t1
            row = {
                "parameters": params,
                "tokens": summary["tokens"],
                "steps": summary["steps"],
                "train_seconds": train_s,
                "tokens_per_s": summary["tokens"] / train_s,
                "final_train_loss": summary["final_train_loss"],
                "epochs": summary["tokens"] / self.train_tokens,
                "train_text_tokens": self.train_tokens,
                "key": key,
            }
            done.write_text(json.dumps(row, indent=2))
            self.log(
                f"pretrain: {row['steps']} steps, {row['tokens']:,} tokens ({row['epochs']:.1f} epochs of the "
                f"training text) in {duration(train_s)} ({row['tokens_per_s']:,.0f} tokens/s)"
            )
        scores = self.cached("mha")
        if scores is None:
            t0 = time.time()
            scores = {"init_ppl": self.score(init)["ppl"], **self.score(mha)}
            scores["score_seconds"] = time.time() - t0
            self.store("mha", scores)
        row = {**row, **scores}
        self.log(f"pretrain: test perplexity {row['ppl']:.2f} (random init {row['init_ppl']:.1f})")
        return row

    def run_grid(self, pre: dict, methods: list[str]) -> list[dict]:
        cfg = self.cfg
        D = pre["tokens"]
        mha = self.work / "mha" / "model"
        uplr = cfg.uptrain_peak_lr
        rows = [
            {
                "kind": "mha",
                "groups": cfg.num_heads,
                "method": "-",
                "alpha": 0.0,
                "seed": cfg.pretrain_seed,
                "ppl": pre["ppl"],
                "nll": pre["nll"],
                "seconds": pre["train_seconds"],
            }
        ]
        trained = [a for a in cfg.alphas if a > 0]
        if cfg.control:
            for alpha in trained:
                cell = Cell("control", cfg.num_heads, "-", alpha, cfg.seeds[0])
                rows.append(self.uptrain_cell(cell, mha, D, uplr))
        total = len(cfg.groups) * len(methods)
        for gi, g in enumerate(cfg.groups):
            for mi, method in enumerate(methods):
                for si, seed in enumerate(cfg.seeds):
                    headline = method in cfg.headline_methods
                    wanted = [a for a in trained if si == 0 or (a == cfg.headline_alpha and headline)]
                    # mean and first ignore the seed: their alpha = 0 cell would repeat seed 0's number
                    at_zero = [0.0] if 0.0 in cfg.alphas and (si == 0 or method in SEEDED_METHODS) else []
                    names = [Cell("gqa", g, method, a, seed) for a in [*at_zero, *wanted]]
                    if not names:
                        continue
                    rows.extend(
                        self.conversion(g, method, seed, names, mha, D, uplr, f"{gi * len(methods) + mi + 1}/{total}")
                    )
        return rows

    def conversion(
        self, g: int, method: str, seed: int, cells: list[Cell], mha: Path, D: int, uplr: float, progress: str
    ) -> list[dict]:
        """Convert once, score it (alpha = 0), then uptrain a copy for each alpha."""
        cfg = self.cfg
        done = [self.cached(c.key) for c in cells]
        self.reused += sum(r is not None for r in done)
        if all(done):
            self.log(
                f"{progress} {g_name(g, cfg.num_heads)} {method} seed {seed}: reused "
                + ", ".join(f"{pct(r['alpha'])} {r['ppl']:.2f}" for r in done)
            )
            return done
        from convert import convert_checkpoint

        converted = self.work / "converted" / f"g{g}-{method}-s{seed}"
        options = None
        if method == "calibrated":
            options = {
                "calibration_data": str(self.data),
                "calibration_tokens": cfg.calibration_tokens,
                "calibration_seq_len": cfg.block_size,
            }
        t0 = time.time()
        report = convert_checkpoint(
            mha,
            converted,
            g,
            method,
            overwrite=True,
            seed=seed,
            progress=False,
            method_options=options,
            write_modeling_code=cfg.arch == "t5",  # T5's classes have no KV-head count: gqa_t5 code ships
        )
        convert_s = time.time() - t0
        errs = [r for r in report.per_layer if "k_rel_err" in r]
        rel = {k: sum(r[k] for r in errs) / len(errs) for k in ("k_rel_err", "v_rel_err")} if errs else {}
        out = []
        for cell, cached in zip(cells, done):
            if cached is not None:
                out.append(cached)
                continue
            if cell.alpha == 0:
                t1 = time.time()
                s = self.score(converted)
                row = {
                    **dataclasses.asdict(cell),
                    **s,
                    "convert_seconds": convert_s,
                    "uptrain_tokens": 0,
                    "uptrain_steps": 0,
                    "seconds": convert_s + time.time() - t1,
                    **rel,
                }
                out.append(self.store(cell.key, row))
            else:
                row = self.uptrain_cell(cell, converted, D, uplr, convert_s, rel)
                out.append(row)
        if not self.keep_models:
            shutil.rmtree(converted, ignore_errors=True)
        self.log(
            f"{progress} {g_name(g, cfg.num_heads)} {method:<10} seed {seed}: "
            + ", ".join(f"{pct(r['alpha'])} {r['ppl']:.2f}" for r in out)
        )
        return out

    def uptrain_cell(
        self, cell: Cell, model: Path, D: int, uplr: float, convert_s: float = 0.0, rel: dict | None = None
    ) -> dict:
        cached = self.cached(cell.key)
        if cached is not None:
            if cell.kind == "control":
                self.reused += 1
            return cached
        t0 = time.time()
        run_dir = self.work / "runs" / cell.key
        summary = train(
            self.cfg,
            model,
            run_dir,
            self.data,
            cell.seed,
            uplr,
            {"compute_fraction": cell.alpha, "pretraining_tokens": D},
        )
        train_s = time.time() - t0
        s = self.score(run_dir / "model")
        if not self.keep_models:
            shutil.rmtree(run_dir, ignore_errors=True)
        row = {
            **dataclasses.asdict(cell),
            **s,
            "uptrain_tokens": summary["tokens"],
            "uptrain_steps": summary["steps"],
            "uptrain_seconds": train_s,
            "convert_seconds": convert_s,
            "seconds": time.time() - t0 + convert_s,
            **(rel or {}),
        }
        if cell.kind == "control":
            self.log(
                f"control: MHA trained on for {pct(cell.alpha)} ({summary['tokens']:,} tokens, "
                f"{summary['steps']} steps): {s['ppl']:.2f}"
            )
        return self.store(cell.key, row)


# ============================================================================================== main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        cfg = make_config(args)
        data = default_data(args.data)
        test = default_test(args.test, data)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    start = time.time()
    code = provenance()  # before anything is imported: the files as this run reads them
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    log = Log(args.quiet, args.json)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("GQA_CONVERT_CACHE", Path.home() / ".cache" / "gqa-convert"))
    work = Path(args.work) if args.work else cache / f"replicate-{work_hash(cfg, data)}"
    work.mkdir(parents=True, exist_ok=True)
    methods, notes = available_methods(cfg.methods, cfg.arch)
    for n in notes:
        log(n)
    hw = hardware(threads)
    log(
        f"replicate: {len(cfg.groups)} G x {len(methods)} methods x alphas {', '.join(pct(a) for a in cfg.alphas)}"
        f", seeds {cfg.seeds}; {hw['summary']}; work {work}"
    )

    runner = Runner(cfg, data, test, work, log, args.fresh, args.keep_models, args.quiet or args.json)
    timings = runner.prepare()
    pre = runner.pretrain()
    rows = runner.run_grid(pre, methods)
    agg = aggregate(rows)
    claims = check_claims(agg, cfg, methods)
    if pre["ppl"] >= pre["init_ppl"]:
        notes.append(
            f"the pretrained MHA model ({pre['ppl']:.2f}) does not beat its random init "
            f"({pre['init_ppl']:.2f}): the run is not meaningful"
        )
    wall = time.time() - start
    command = "python bench/replicate_paper.py " + " ".join(argv)
    finished = time.strftime("%Y-%m-%d %H:%M:%S %z")
    results = {
        "command": command,
        "quick": args.quick,
        "config": dataclasses.asdict(cfg),
        "methods": methods,
        "data": str(data),
        "test": str(test),
        "work": str(work),
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers), trained on the training text",
            "vocab_size": len(runner.tokenizer),
            "seconds": timings["tokenizer_seconds"],
        },
        "eval": runner.eval_info,
        "pretrain": pre,
        "rows": rows,
        "aggregate": {json.dumps(list(k)): v for k, v in agg.items()},
        "claims": claims,
        "notes": notes,
        "hardware": hw,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_seconds": wall,
        "cells_reused": runner.reused,
        # commit, command and date as bench/tables.py reads them, beside the digests of the files the run read
        "provenance": {**code, "commit": (code.get("git_head") or "?")[:7], "command": command, "date": finished},
        "finished": finished,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot_methods(results, out / "fig_methods.png")
    plot_alpha(results, out / "fig_alpha.png")
    log(f"done in {duration(wall)}: {out}/results.md, results.json, fig_methods.png, fig_alpha.png")
    for c in claims:
        log(f"  {'holds' if c['holds'] else 'not tested' if c['holds'] is None else 'does NOT hold'}: {c['claim']}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
