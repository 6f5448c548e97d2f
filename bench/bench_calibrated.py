#!/usr/bin/env python
"""Benchmark the merge methods side by side on real weights (issue #4): perplexity after conversion, calibration
tokens, wall time and peak memory of the conversion.

    python bench/bench_calibrated.py                     # SmolLM2-135M, GQA-3 -> MQA, the four methods
    python bench/bench_calibrated.py --json              # results as JSON only
    python bench/bench_calibrated.py --methods mean calibrated --calibration-tokens 4096

Every conversion runs `gqa-convert convert` (this checkout's CLI, `python -m convert.cli`) in a fresh subprocess;
wall time is measured around it (start to reap) and peak RSS is that command's kernel high-water mark (GNU time's
%M, as in bench_convert.py), so interpreter start-up and imports are included in both. Perplexity is then measured in
this process on WikiText-2 test, as everywhere in gqa-convert: the file tokenized whole without special tokens,
the first 12 windows of 512 tokens, no overlap. Calibration reads WikiText-2 valid (never test).

Rows:
    original                the unconverted model (reference perplexity)
    mean / first            weight-only pooling (the paper's method and its ablation)
    calibrated contiguous   --method calibrated --grouping contiguous
    calibrated similarity   --method calibrated --grouping similarity (with G=1 there is one group: the same
                            merge as contiguous, timed separately)
    reconstructed           --method reconstructed (calibrated, then block-wise reconstruction of each layer)

The data folder comes from --data-dir or $GQA_DATA_DIR (it holds wikitext-2/valid.txt and test.txt).

    python bench/bench_calibrated.py --ratio --no-methods              # calibration time / one float32 forward
    python bench/bench_calibrated.py --sizes 135M 1B 3B --no-methods   # scaling table on synthetic llamas

--ratio times, in this process and one after the other, one float32 forward pass of the model over the calibration
tokens (batches of 4 x 512, no cache, weights already loaded) and the whole calibrated conversion of the same model
on the same tokens (`convert_checkpoint`, writing included); it prints both and their ratio, with the thread count
and whether the CPU has native bfloat16 (avx512_bf16 / amx_bf16). With `reconstructed` among --methods, that
method's conversion is timed the same way, right after, against the same forward pass; with `reconstructed` the
only calibrated method there, the calibrated conversion is not timed.
--option KEY=VALUE (repeatable) passes a method option to the calibrated methods' rows and timings, for ablations
(e.g. --option reconstruct_epochs=2 --option refit_o=false).

--sizes builds synthetic llama checkpoints (bfloat16 safetensors, random weights, SmolLM2's tokenizer) of about
135M, 1B and 3B parameters, calibrates each to MQA in a fresh `gqa-convert convert` process and reports wall time
and that process's peak RSS, each against the checkpoint's bytes: layer by layer, the peak is one decoder layer,
the embeddings and the calibration activations, not the model. --device picks where calibration runs.

With --uptrain STEPS the mean-pooled and the calibrated conversions are then uptrained the same way, with
recipes/uptrain.py and the recipe's SmolLM2 settings (recipes/configs/smollm2-mqa-cpu.yaml: full training, lr 3e-4,
blocks of 256 tokens, one block per step, on WikiText-2 valid), validating every --eval-every steps on
--eval-blocks blocks of WikiText-2 test. The original model is scored on the same blocks (the recipe's step-0
evaluation of a one-step run), and the table reports the tokens each start needed to get within 10% of it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tables import provenance  # bench/ is this script's folder, first on sys.path

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "mean": ["--method", "mean"],
    "first": ["--method", "first"],
    "calibrated contiguous": ["--method", "calibrated", "--grouping", "contiguous"],
    "calibrated similarity": ["--method", "calibrated", "--grouping", "similarity"],
    "reconstructed": ["--method", "reconstructed"],
}
SHORT = {
    "mean": "mean",
    "first": "first",
    "calibrated": "calibrated contiguous",
    "contiguous": "calibrated contiguous",
    "similarity": "calibrated similarity",
    "reconstructed": "reconstructed",
}


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def timed_convert(args: list[str], log_path: Path) -> tuple[float, int]:
    """Run `python -m convert.cli convert ...` in a child: wall seconds and its own peak RSS in bytes.

    Measured by bench_convert.measure (GNU time's wait4 on a fresh ~2 MB process). os.wait4 on a child forked
    from this process would be wrong: the kernel carries this process's high-water mark across exec.
    """
    from bench_convert import measure

    if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):  # this checkout's convert package
        os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    r = measure([sys.executable, "-m", "convert.cli", "convert", *args], log_path)
    if r["returncode"] != 0:
        raise RuntimeError(
            f"gqa-convert convert {' '.join(args)} failed ({r['returncode']}):\n"
            f"{log_path.read_text(errors='replace')[-3000:]}"
        )
    return r["wall_s"], int(r["peak_rss_mib"] * 2**20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, materialized)")
    ap.add_argument("--num-kv-heads", "-g", type=int, default=1)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(ROWS),
        help=f"rows to run: {', '.join(ROWS)} (or mean, first, calibrated, similarity)",
    )
    ap.add_argument(
        "--data-dir", default=os.environ.get("GQA_DATA_DIR"), help="folder with wikitext-2/ (default $GQA_DATA_DIR)"
    )
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=12, help="test windows of --window tokens")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--workdir", default=None, help="where outputs go (default: a temporary folder, removed)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    ap.add_argument(
        "--uptrain",
        type=int,
        default=0,
        metavar="STEPS",
        help="also uptrain the mean and calibrated starts for STEPS steps and compare them",
    )
    ap.add_argument("--eval-every", type=int, default=8, help="uptraining: steps between validations")
    ap.add_argument("--eval-blocks", type=int, default=16, help="uptraining: validation blocks of 256 tokens")
    ap.add_argument("--no-methods", action="store_true", help="skip the perplexity rows of the methods")
    ap.add_argument("--ratio", action="store_true", help="time calibration against one float32 forward pass")
    ap.add_argument("--sizes", nargs="*", default=[], help=f"scaling table on synthetic llamas: {', '.join(SIZES)}")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where calibration runs")
    ap.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a calibrated-method option (repeatable)"
    )
    args = ap.parse_args()
    quiet = args.json
    if set(args.sizes) - set(SIZES):
        ap.error(f"--sizes {args.sizes}: choose from {', '.join(SIZES)}")

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from convert.eval.perplexity import score_folder, tokenize_file

    have_data = bool(args.data_dir) and (Path(args.data_dir) / "wikitext-2" / "test.txt").is_file()
    if not have_data and not args.no_methods:
        ap.error("no WikiText-2: pass --data-dir or set GQA_DATA_DIR to the folder holding wikitext-2/")
    valid = Path(args.data_dir) / "wikitext-2" / "valid.txt" if have_data else None
    test = Path(args.data_dir) / "wikitext-2" / "test.txt" if have_data else None
    if args.model is None:
        from convert.demo import smollm2

        model_path = smollm2.materialize()
        model_name = "SmolLM2-135M-Instruct (float32)"
    else:
        model_path = Path(args.model)
        model_name = str(model_path)
    rows = [SHORT.get(m, m) for m in args.methods]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown method rows {unknown}: choose from {', '.join(ROWS)}")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenize_file(tokenizer, str(test), args.windows * args.window + 1) if test else None

    def ppl(folder: Path) -> float:
        return score_folder(folder, ids, args.window, max_windows=args.windows).ppl

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gqa-bench-cal-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    extra: dict = {}
    try:
        if args.ratio:
            extra["ratio"] = ratio_run(model_path, valid, args, work, quiet)
        if args.sizes:
            extra["scaling"] = scaling_run(model_path, args, work, quiet)
        if args.no_methods:
            rows = []
        else:
            log(f"original: perplexity of {model_path}", quiet)
            original = {"method": "original", "ppl": ppl(model_path), "calibration_tokens": 0}
            results.append({**original, "convert_s": None, "peak_rss_mb": None})
        # Warm the page cache and the imports once, outside the measurements (methods rows only).
        if rows:
            timed_convert(
                [
                    str(model_path),
                    str(work / "warm"),
                    "-g",
                    str(args.num_kv_heads),
                    "--quiet",
                    "--overwrite",
                    "--method",
                    "mean",
                ],
                work / "warm.log",
            )
        for row in rows:
            out = work / row.replace(" ", "-")
            cmd = [str(model_path), str(out), "-g", str(args.num_kv_heads), "--quiet", "--overwrite", *ROWS[row]]
            if "calibrated" in ROWS[row] or "reconstructed" in ROWS[row]:
                cmd += ["--calibration-data", str(valid), "--calibration-tokens", str(args.calibration_tokens)]
                cmd += [x for kv in args.option for x in ("--option", kv)]
            log(f"{row}: gqa-convert convert {' '.join(cmd)}", quiet)
            wall, rss = timed_convert(cmd, work / f"{out.name}.log")
            prov = json.loads((out / "gqa_convert.json").read_text())
            tokens = prov.get("calibration", {}).get("calibration_tokens", 0)
            value = ppl(out)
            results.append(
                {
                    "method": row,
                    "ppl": value,
                    "calibration_tokens": tokens,
                    "convert_s": wall,
                    "peak_rss_mb": rss / 2**20,
                }
            )
            log(f"  ppl {value:.2f}, {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB", quiet)
            if not args.uptrain:
                shutil.rmtree(out, ignore_errors=True)
        if args.uptrain:
            starts = {r: work / r.replace(" ", "-") for r in ("mean", "calibrated contiguous") if r in rows}
            uptraining = uptrain_compare(model_path, starts, valid, test, args, work, quiet)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    meta = {
        "model": model_name,
        "num_kv_heads": args.num_kv_heads,
        "eval": f"WikiText-2 test, first {args.windows} windows x {args.window} tokens, stride {args.window}",
        "calibration": f"WikiText-2 valid, {args.calibration_tokens} tokens",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }
    if args.json:
        out = {"provenance": provenance(), "meta": meta, "results": results, **extra}
        if args.uptrain:
            out["uptraining"] = uptraining
        print(json.dumps(out, indent=2))
        return 0
    if "ratio" in extra:
        print_ratio(extra["ratio"])
    if "scaling" in extra:
        print_scaling(extra["scaling"])
    if results:
        print(f"{meta['model']}, -> {args.num_kv_heads} KV heads; {meta['eval']}; calibration on {meta['calibration']}")
        print(f"{'method':<24}{'ppl':>12}{'calib. tokens':>15}{'convert s':>11}{'peak RSS MiB':>14}")
    for r in results:
        conv = "" if r["convert_s"] is None else f"{r['convert_s']:.1f}"
        rss = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        print(f"{r['method']:<24}{r['ppl']:>12.2f}{r['calibration_tokens']:>15}{conv:>11}{rss:>14}")
    print(f"(load average at the end: {meta['load_average_1m']:.2f} on {meta['cores']} cores)")
    if args.uptrain:
        print_uptraining(uptraining)
    return 0


# Synthetic llama shapes (hidden, layers, heads, KV heads, MLP width) with SmolLM2's vocabulary (49,152, tied):
# 135M is SmolLM2-135M's own shape; 1B and 3B follow Llama-3.2-1B and -3B.
SIZES = {
    "135M": (576, 30, 9, 3, 1536),
    "1B": (2048, 16, 32, 8, 8192),
    "3B": (3072, 28, 24, 8, 8192),
}


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def ratio_run(model_path: Path, valid: Path | None, args, work: Path, quiet: bool) -> dict:
    """One float32 forward pass over the calibration tokens, then the calibrated conversion on the same tokens,
    in this process with the same threads: both wall times and their ratio."""
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from convert import convert_checkpoint
    from convert.methods.text import calibration_ids

    data = str(valid) if valid else None
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    ids, where = calibration_ids(model_path, data, args.calibration_tokens, 512, 0, vocab)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        model(ids[:1, :64], use_cache=False)  # warm-up: first-call allocations
        start = time.perf_counter()
        for batch in torch.split(ids, 4):
            model(batch, use_cache=False)
        forward_s = time.perf_counter() - start
    del model
    log(f"ratio: float32 forward over {ids.numel()} tokens: {forward_s:.1f} s", quiet)
    options = {"calibration_data": data, "calibration_tokens": args.calibration_tokens, "device": args.device}
    options.update(parse_options(args.option))
    seconds = {}
    # Calibrated (asked for as any calibrated row, or by default) and reconstructed, as --methods names them: a
    # large-budget reconstructed run need not pay for a calibrated conversion as well.
    asked = {SHORT.get(m, m) for m in args.methods}
    timed = ["calibrated"] if asked & {"calibrated contiguous", "calibrated similarity"} else []
    timed += ["reconstructed"] if "reconstructed" in asked else []
    for method in timed or ["calibrated"]:
        start = time.perf_counter()
        convert_checkpoint(
            model_path, work / "ratio-out", 1, method, progress=False, overwrite=True, method_options=options
        )
        seconds[method] = time.perf_counter() - start
        shutil.rmtree(work / "ratio-out", ignore_errors=True)
        log(f"ratio: {method} conversion: {seconds[method]:.1f} s ({seconds[method] / forward_s:.2f} x)", quiet)
    extra = {}
    if "calibrated" in seconds:
        extra = {"calibrated_convert_s": seconds["calibrated"], "ratio": seconds["calibrated"] / forward_s}
    if "reconstructed" in seconds:
        extra |= {
            "reconstructed_convert_s": seconds["reconstructed"],
            "ratio_reconstructed": seconds["reconstructed"] / forward_s,
        }
    return {
        **extra,
        "options": options,
        "tokens": int(ids.numel()),
        "calibration_data": where,
        "forward_float32_s": forward_s,
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "device": args.device,
    }


def parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> method options (JSON values: numbers, true/false; anything else a string)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def print_ratio(r: dict) -> None:
    print(
        f"calibration cost: {r['tokens']} tokens of {r['calibration_data']}, {r['torch_threads']} torch threads, "
        f"CPU native bf16: {'yes' if r['cpu_native_bf16'] else 'no'}, calibration on {r['device']}"
    )
    print(f"  one float32 forward pass   {r['forward_float32_s']:>8.1f} s")
    if "ratio" in r:
        print(f"  calibrated conversion      {r['calibrated_convert_s']:>8.1f} s")
        print(f"  ratio                      {r['ratio']:>8.2f} x   (goal <= 3, bar <= 4)")
    if "ratio_reconstructed" in r:
        print(f"  reconstructed conversion   {r['reconstructed_convert_s']:>8.1f} s")
        print(f"  ratio                      {r['ratio_reconstructed']:>8.2f} x   (goal <= 6)")


def synthetic_llama(folder: Path, size: str, tokenizer_from: Path) -> tuple[int, int]:
    """A llama checkpoint of SIZES[size] with random bfloat16 weights in shards of at most 2 GB, and the tokenizer
    of `tokenizer_from`; returns (parameters, bytes of weights). Written tensor by tensor (never the whole model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    hidden, layers, heads, kv, inter = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        dtype="bfloat16",
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    d = hidden // heads
    shapes = {"model.embed_tokens.weight": (49152, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                f"{p}input_layernorm.weight": (hidden,),
                f"{p}post_attention_layernorm.weight": (hidden,),
                f"{p}self_attn.q_proj.weight": (heads * d, hidden),
                f"{p}self_attn.k_proj.weight": (kv * d, hidden),
                f"{p}self_attn.v_proj.weight": (kv * d, hidden),
                f"{p}self_attn.o_proj.weight": (hidden, heads * d),
                f"{p}mlp.gate_proj.weight": (inter, hidden),
                f"{p}mlp.up_proj.weight": (inter, hidden),
                f"{p}mlp.down_proj.weight": (hidden, inter),
            }
        )
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, shards, total = {}, {}, 0, [], 0

    def flush() -> None:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in shard})

    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if shard and shard_bytes + t.numel() * 2 > 2 * 10**9:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel()
    flush()
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, total * 2


def scaling_run(tokenizer_from: Path, args, work: Path, quiet: bool) -> list[dict]:
    """Calibrate each synthetic size to MQA in a fresh process: wall time and peak RSS against the model's bytes."""
    rows = []
    for size in args.sizes:
        src = work / f"synthetic-{size}"
        log(f"scaling: writing a synthetic {size} llama to {src}", quiet)
        params, nbytes = synthetic_llama(src, size, tokenizer_from)
        out = work / f"synthetic-{size}-mqa"
        cmd = [str(src), str(out), "-g", "1", "--method", "calibrated", "--quiet", "--overwrite"]
        cmd += ["--calibration-tokens", str(args.calibration_tokens), "--device", args.device]
        log(f"scaling: gqa-convert convert {' '.join(cmd)}", quiet)
        wall, rss = timed_convert(cmd, work / f"synthetic-{size}.log")
        rows.append(
            {
                "size": size,
                "parameters": params,
                "model_bytes": nbytes,
                "calibration_tokens": args.calibration_tokens,
                "device": args.device,
                "convert_s": wall,
                "seconds_per_gb": wall / (nbytes / 1e9),
                "peak_rss_bytes": rss,
                "peak_rss_over_model_bytes": rss / nbytes,
            }
        )
        log(f"  {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB ({rss / nbytes:.2f} x the model's bytes)", quiet)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def print_scaling(rows: list[dict]) -> None:
    print("calibrated conversion to MQA of synthetic bfloat16 llamas (fresh process each; peak RSS by GNU time):")
    head = f"{'size':<6}{'params':>9}{'model GB':>10}{'tokens':>8}{'time s':>9}{'s/GB':>7}"
    print(f"{head}{'peak RSS GB':>13}{'RSS/model':>11}")
    for r in rows:
        print(
            f"{r['size']:<6}{r['parameters'] / 1e9:>8.2f}B{r['model_bytes'] / 1e9:>10.2f}{r['calibration_tokens']:>8}"
            f"{r['convert_s']:>9.1f}{r['seconds_per_gb']:>7.1f}{r['peak_rss_bytes'] / 1e9:>13.2f}"
            f"{r['peak_rss_over_model_bytes']:>11.2f}"
        )


def uptrain_run(model: Path, out: Path, steps: int, valid: Path, test: Path, args, quiet: bool) -> list[dict]:
    """One uptraining run (convert.uptrain) with the shipped SmolLM2 config; its evaluation rows (tokens, val_ppl)."""
    cmd = [
        sys.executable,
        "-m",
        "convert.uptrain",
        "smollm2-mqa-cpu",
        f"model={model}",
        f"output_dir={out}",
        f"data={valid}",
        f"validation={test}",
        f"max_eval_blocks={args.eval_blocks}",
        f"max_steps={steps}",
        f"eval_every={args.eval_every}",
        "save_every=0",
        "resume=never",
        "micro_batch_size=1",
        "train=full",
        "lr=3e-4",
        "report_to=none",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log(f"  {' '.join(cmd[1:])}", quiet)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"uptraining failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"tokens": r["tokens"], "ppl": r["val_ppl"]} for r in rows if r["kind"] == "eval"]


def uptrain_compare(original: Path, starts: dict, valid: Path, test: Path, args, work: Path, quiet: bool) -> dict:
    log("uptraining: the original model on the validation blocks (step-0 evaluation)", quiet)
    ref = uptrain_run(original, work / "up-original", 1, valid, test, args, quiet)[0]["ppl"]
    runs = {}
    for name, folder in starts.items():
        log(f"uptraining from the {name} start, {args.uptrain} steps", quiet)
        curve = uptrain_run(folder, work / f"up-{name.replace(' ', '-')}", args.uptrain, valid, test, args, quiet)
        within = next((c["tokens"] for c in curve if c["ppl"] <= 1.1 * ref), None)
        runs[name] = {"curve": curve, "tokens_to_within_10pct": within}
    return {
        "original_ppl": ref,
        "goal_ppl": 1.1 * ref,
        "eval_blocks": args.eval_blocks,
        "block_size": 256,
        "steps": args.uptrain,
        "runs": runs,
    }


def print_uptraining(u: dict) -> None:
    print(
        f"\nuptraining (convert.uptrain, SmolLM2 recipe settings), validation on {u['eval_blocks']} x "
        f"{u['block_size']} tokens of WikiText-2 test; original {u['original_ppl']:.2f}, "
        f"goal (within 10%) {u['goal_ppl']:.2f}"
    )
    names = list(u["runs"])
    tokens = [c["tokens"] for c in u["runs"][names[0]]["curve"]]
    print(f"{'tokens':>8}" + "".join(f"{n:>24}" for n in names))
    for i, t in enumerate(tokens):
        print(f"{t:>8}" + "".join(f"{u['runs'][n]['curve'][i]['ppl']:>24.2f}" for n in names))
    for n in names:
        w = u["runs"][n]["tokens_to_within_10pct"]
        print(f"{n}: {'not within 10% after ' + str(tokens[-1]) + ' tokens' if w is None else f'{w} tokens'}")


if __name__ == "__main__":
    sys.exit(main())
