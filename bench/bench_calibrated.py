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

The data folder comes from --data-dir or $GQA_DATA_DIR (it holds wikitext-2/valid.txt and test.txt).

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

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "mean": ["--method", "mean"],
    "first": ["--method", "first"],
    "calibrated contiguous": ["--method", "calibrated", "--grouping", "contiguous"],
    "calibrated similarity": ["--method", "calibrated", "--grouping", "similarity"],
}
SHORT = {
    "mean": "mean",
    "first": "first",
    "calibrated": "calibrated contiguous",
    "contiguous": "calibrated contiguous",
    "similarity": "calibrated similarity",
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
    args = ap.parse_args()
    quiet = args.json

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from convert.evaluate import score_folder, tokenize_file

    if not args.data_dir or not (Path(args.data_dir) / "wikitext-2" / "test.txt").is_file():
        ap.error("no WikiText-2: pass --data-dir or set GQA_DATA_DIR to the folder holding wikitext-2/")
    valid = Path(args.data_dir) / "wikitext-2" / "valid.txt"
    test = Path(args.data_dir) / "wikitext-2" / "test.txt"
    if args.model is None:
        from convert import smollm2

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
    ids = tokenize_file(tokenizer, str(test), args.windows * args.window + 1)

    def ppl(folder: Path) -> float:
        return score_folder(folder, ids, args.window, max_windows=args.windows).ppl

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gqa-bench-cal-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        log(f"original: perplexity of {model_path}", quiet)
        results.append(
            {
                "method": "original",
                "ppl": ppl(model_path),
                "calibration_tokens": 0,
                "convert_s": None,
                "peak_rss_mb": None,
            }
        )
        # Warm the page cache and the imports once, outside the measurements.
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
            if "calibrated" in ROWS[row]:
                cmd += ["--calibration-data", str(valid), "--calibration-tokens", str(args.calibration_tokens)]
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
        out = {"meta": meta, "results": results}
        if args.uptrain:
            out["uptraining"] = uptraining
        print(json.dumps(out, indent=2))
        return 0
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
