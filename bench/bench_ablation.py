#!/usr/bin/env python
"""Ablation of the calibrated merge: what each ingredient adds, one conversion per row, scored side by side.

    python bench/bench_ablation.py --data-dir ../shared/data                   # SmolLM2-135M GQA-3 -> MQA
    python bench/bench_ablation.py --model PATH -g 2 --data-dir ../shared/data --window 256 --windows 96
    python bench/bench_ablation.py --rows mean calibrated --json              # some rows; JSON only

Rows are cumulative: each turns one more ingredient on over the row above, so the perplexity step between two rows
is what that ingredient adds on top of the ones before it. Every row is reachable from the command line
(`gqa-convert convert ... --method M --option KEY=VALUE ...`, the options shown in the table), so any row can be
reproduced on its own. Calibration reads WikiText-2 valid, perplexity WikiText-2 test (the file tokenized whole,
the first --windows windows of --window tokens, no overlap), as `bench/bench_calibrated.py` does.

With --out FILE the JSON (with its provenance) is also written there, for `bench/tables.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tables import provenance  # bench/ is this script's folder, first on sys.path

ROOT = Path(__file__).resolve().parent.parent
# The closed form with every refinement off: plain PCA-style merges of keys and values on one stream.
BARE = {
    "stream": "converted",
    "key_centering": "none",
    "key_weighting": 0.0,
    "value_weighting": 0.0,
    "refit_o": False,
}
# (row, what it adds, method, options): cumulative.
ROWS: list[tuple[str, str, str, dict]] = [
    ("mean", "the paper's mean pooling", "mean", {}),
    ("closed form", "rotary-exact key merge and value subspace, folded into q/o", "calibrated", dict(BARE)),
    ("+ slow-pair centering", "key offsets the softmax cannot see are not fitted", "calibrated",
     {**BARE, "key_centering": "global"}),
    ("+ attention weighting", "moments weighted by the attention positions receive", "calibrated",
     {**BARE, "key_centering": "global", "key_weighting": 0.5, "value_weighting": 0.5}),
    ("+ o re-fit", "o_proj re-fitted to the original attention output", "calibrated",
     {**BARE, "key_centering": "global", "key_weighting": 0.5, "value_weighting": 0.5, "refit_o": True}),
    ("+ two streams (calibrated)", "drift take-back and input correction towards the original stream",
     "calibrated", {}),
    ("+ reconstruction (reconstructed)", "Adam on each layer's q/k/v/o against its attention output",
     "reconstructed", {}),
]  # fmt: skip


def option_flags(options: dict) -> str:
    return " ".join(f"--option {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in options.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, materialized)")
    ap.add_argument("--num-kv-heads", "-g", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("GQA_DATA_DIR"), help="folder with wikitext-2/")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--calibration-seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--rows", nargs="+", default=None, help="row names (default: all)")
    ap.add_argument("--name", default=None, help="the model's name in the results (default: its folder name)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    data = Path(args.data_dir or "") / "wikitext-2"
    if not args.data_dir or not (data / "test.txt").is_file():
        ap.error("no WikiText-2: pass --data-dir or set GQA_DATA_DIR to the folder holding wikitext-2/")
    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows]
    if not rows:
        ap.error(f"--rows {args.rows}: choose from {', '.join(r[0] for r in ROWS)}")

    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from convert import convert_checkpoint
    from convert.eval.perplexity import score_folder, tokenize_file

    if args.model is None:
        from convert.demo import smollm2

        model, name = smollm2.materialize(), "SmolLM2-135M-Instruct (float32)"
    else:
        model, name = Path(args.model), args.name or Path(args.model).name
    ids = tokenize_file(AutoTokenizer.from_pretrained(model), str(data / "test.txt"), args.windows * args.window + 1)

    def ppl(folder: Path) -> float:
        return score_folder(folder, ids, args.window, max_windows=args.windows).ppl

    say = (lambda *_: None) if args.json else print
    results = [{"row": "original", "adds": "", "method": "-", "options": {}, "ppl": ppl(model), "convert_s": None}]
    say(f"original: {results[0]['ppl']:.2f}")
    work = Path(tempfile.mkdtemp(prefix="gqa-ablation-"))
    try:
        for row, adds, method, options in rows:
            opts = dict(options)
            if method != "mean":
                opts.update(
                    calibration_data=str(data / "valid.txt"),
                    calibration_tokens=args.calibration_tokens,
                    calibration_seq_len=args.calibration_seq_len,
                )
            start = time.perf_counter()
            convert_checkpoint(
                model, work / "out", args.num_kv_heads, method, progress=False, overwrite=True, method_options=opts
            )
            seconds = time.perf_counter() - start
            results.append(
                {"row": row, "adds": adds, "method": method, "options": options, "ppl": ppl(work / "out"),
                 "convert_s": round(seconds, 1)}
            )  # fmt: skip
            shutil.rmtree(work / "out", ignore_errors=True)
            say(f"{row}: {results[-1]['ppl']:.2f} ({seconds:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results[0]["ppl"]
    table_rows = []
    for prev, r in zip([None, *results], results):
        step = "" if prev is None or prev["row"] == "original" else f"{r['ppl'] - prev['ppl']:+,.2f}"
        flags = (
            ""
            if r["method"] == "-"
            else "`" + " ".join(["--method", r["method"], option_flags(r["options"])]).strip() + "`"
        )
        table_rows.append(
            [r["row"], f"{r['ppl']:,.2f}", f"{r['ppl'] / base:.2f}×", step, r["adds"], flags]
        )  # fmt: skip
    out = {
        "provenance": provenance(),
        "meta": {
            "model": name,
            "num_kv_heads": args.num_kv_heads,
            "eval": f"WikiText-2 test, first {args.windows} windows x {args.window} tokens",
            "calibration": f"WikiText-2 valid, {args.calibration_tokens} tokens",
            "load_average_1m": os.getloadavg()[0],
        },
        "results": results,
        "table": {
            "columns": ["row", "perplexity", "/ original", "step", "what it adds", "reproduce"],
            "rows": table_rows,
        },
    }
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
