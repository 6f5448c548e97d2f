#!/usr/bin/env python
"""Uptraining efficiency against the published anchors (issue #22, item 3): how many uptraining tokens, as a fraction
alpha of the pretraining tokens, a converted MQA model needs to get within 5% of the original's perplexity, from three
starting points: `mean` (the paper's pooling), `calibrated` (this project's merge) and `calibrated` uptrained with the
original as teacher (`teacher` / `kd_weight` of convert.uptrain).

    python bench/bench_efficiency.py                 # both models (about 45 min on a shared 2-core CPU)
    python bench/bench_efficiency.py --parts llama   # the replication llama only
    python bench/bench_efficiency.py --quick         # smoke run: the tiny replication llama, 3 alphas (< 1 min)

The llama is the one of bench/replicate_paper.py (4.2M-parameter MHA llama pretrained on D = 1.0M tokens of
WikiText-2 valid; the replication's own code pretrains, converts, uptrains and scores it, and its cache of cells is
shared: a cell the replication computed is reused here, and the other way round). Each alpha of the grid is its own
uptraining run with the replication's recipe (warmup + cosine over that run's budget, peak lr 1e-4, where pretraining
ended), not a checkpoint part-way through a longer run: a point mid-way through a cosine schedule has not annealed,
so it would overstate the tokens needed. The MHA model trained on for the same budgets is the control (up to
--control-max-alpha). Alpha runs from 0 up the grid (0.25% ... 20%) and a start stops at its first alpha within both
goals (--whole-grid: every alpha); one that has not reached the goal by 20% runs 50%, then 100% (up to --max-alpha).
The crossing is interpolated linearly in log alpha between the two grid points around it (the gap perplexity -
goal), with alpha the tokens each run trained on over D (budgets are whole steps), against two goals: 1.05 x the MHA
original (alpha = 0), and 1.05 x the control trained on as long.

SmolLM2-135M-Instruct (real weights, convert/demo/smollm2.py) is converted GQA-3 -> MQA the same three ways and
uptrained for --smollm2-tokens tokens on WikiText-2 valid (one run each, the recipe's settings: lr 3e-4, warmup 1
step, cosine to 0.1 x lr, blocks of 512 tokens), validating every --smollm2-eval-every steps on the first
--smollm2-eval-blocks blocks of 512 tokens of WikiText-2 test (the library's own validation). The control is the
original trained the same way; its step-0 evaluation is the original's perplexity on those blocks. With a budget
of tens of thousands of tokens against the 2T tokens SmolLM2-135M was pretrained on, this measures where the curve
is, not the crossing: no extrapolation.

Writes bench/results/efficiency-COMMIT.json (--output to change it; --quick writes efficiency-COMMIT-quick.json)
with a `table` (the summary beside the anchors), `curves_table` and `smollm2_curves_table` for bench/tables.py
(`<!-- table: FILE.json#curves_table -->`), and the provenance. Finished
llama cells and SmolLM2 runs are kept under --work (default: $GQA_CONVERT_CACHE or ~/.cache/gqa-convert); --fresh
ignores them. --json prints the results on stdout (progress on stderr). Exit status 0, 2 on bad arguments or data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from efficiency_math import crossing, first_within, pct
from replicate_paper import Cell, Log, Runner, available_methods, train
from replication_analysis import QUICK, Config
from replication_setup import default_data, default_test, hardware, short_hash
from replication_setup import provenance as code_digests
from tables import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TOLERANCE = 0.05  # "within 5% of the original's perplexity"
GRID = [0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.10, 0.20]
EXTEND = [0.5, 1.0]
QUICK_GRID = [0.0, 0.01, 0.05]
STARTS = ("mean", "calibrated", "calibrated+kd")
SMOLLM2_PRETRAIN_TOKENS = 2_000_000_000_000  # the SmolLM2-135M model card: "trained on 2 trillion tokens"

ANCHORS = [
    {
        "study": "DHA (Chen et al. 2024)",
        "model": "LLaMA-family checkpoints, 4× fewer KV heads (75% of the KV cache saved)",
        "measure": "average downstream task score",
        "start": "DHA (searched head grouping, learned linear fusion)",
        "reached": "97.6% of the original",
        "fraction": "0.25%",
        "link": "https://arxiv.org/abs/2406.06567",
    },
    {
        "study": "GQA (Ainslie et al. 2023)",
        "model": "T5-XXL, MQA and GQA-8",
        "measure": "downstream tasks (summarization, translation, QA)",
        "start": "mean pooling",
        "reached": "GQA-8 close to MHA-XXL (the paper's uptraining fraction)",
        "fraction": "5%",
        "link": "https://arxiv.org/abs/2305.13245",
    },
]


# ============================================================================================== the llama


def llama_config(quick: bool, grid: list[float], seed: int) -> Config:
    base = dict(QUICK) if quick else {}
    base.update(groups=[1], methods=["mean", "calibrated"], alphas=grid, seeds=[seed], control=True)
    return Config(**base)


def converted_folder(runner: Runner, method: str, seed: int) -> Path:
    """The MQA conversion of the MHA model (the replication's folder and options), converted again if gone."""
    from convert import convert_checkpoint

    cfg = runner.cfg
    folder = runner.work / "converted" / f"g1-{method}-s{seed}"
    if not (folder / "config.json").is_file():
        options = None
        if method == "calibrated":
            options = {
                "calibration_data": str(runner.data),
                "calibration_tokens": cfg.calibration_tokens,
                "calibration_seq_len": cfg.block_size,
            }
        convert_checkpoint(
            runner.work / "mha" / "model", folder, 1, method, overwrite=True, seed=seed, progress=False,
            method_options=options,
        )  # fmt: skip
    return folder


def kd_cell(runner: Runner, alpha: float, D: int, seed: int, kd_weight: float) -> dict:
    """Calibrated MQA uptrained for alpha x D tokens with the MHA original as teacher (cached like a replication
    cell)."""
    key = f"kd{kd_weight:g}-g1-calibrated-a{alpha:g}-s{seed}"
    cached = runner.cached(key)
    if cached is not None:
        runner.reused += 1
        return cached
    cfg, mha = runner.cfg, runner.work / "mha" / "model"
    start = converted_folder(runner, "calibrated", seed)
    run_dir = runner.work / "runs" / key
    t0 = time.time()
    budget = {"compute_fraction": alpha, "pretraining_tokens": D, "teacher": str(mha), "kd_weight": kd_weight}
    summary = train(cfg, start, run_dir, runner.data, seed, cfg.uptrain_peak_lr, budget)
    train_s = time.time() - t0
    s = runner.score(run_dir / "model")
    shutil.rmtree(run_dir, ignore_errors=True)
    row = {
        "kind": "kd",
        "groups": 1,
        "method": "calibrated+kd",
        "alpha": alpha,
        "seed": seed,
        "kd_weight": kd_weight,
        **s,
        "uptrain_tokens": summary["tokens"],
        "uptrain_steps": summary["steps"],
        "uptrain_seconds": train_s,
        "seconds": time.time() - t0,
    }
    return runner.store(key, row)


def start_rows(runner: Runner, start: str, alphas: list[float], D: int, seed: int, kd_weight: float) -> list[dict]:
    cfg = runner.cfg
    if start == "calibrated+kd":
        zero = start_rows(runner, "calibrated", [0.0], D, seed, kd_weight)
        return zero + [kd_cell(runner, a, D, seed, kd_weight) for a in alphas if a > 0]
    cells = [Cell("gqa", 1, start, a, seed) for a in alphas]
    mha = runner.work / "mha" / "model"
    return runner.conversion(1, start, seed, cells, mha, D, cfg.uptrain_peak_lr, start)


def control_rows(runner: Runner, alphas: list[float], D: int, seed: int, pre: dict) -> list[dict]:
    cfg, mha = runner.cfg, runner.work / "mha" / "model"
    rows = [{"alpha": 0.0, "ppl": pre["ppl"], "uptrain_tokens": 0}]
    for a in alphas:
        if a > 0:
            rows.append(runner.uptrain_cell(Cell("control", cfg.num_heads, "-", a, seed), mha, D, cfg.uptrain_peak_lr))
    return rows


def curve(rows: list[dict]) -> list[dict]:
    """One point per alpha (the first row given for it), sorted."""
    keep = ("alpha", "ppl", "uptrain_tokens", "uptrain_steps", "seconds")
    by_alpha: dict[float, dict] = {}
    for r in rows:
        by_alpha.setdefault(r["alpha"], {k: r[k] for k in keep if k in r})
    return [by_alpha[a] for a in sorted(by_alpha)]


def crossings(points: list[dict], mha_ppl: float, control: list[dict], D: int) -> dict:
    """Where `points` come within 5% of the MHA original and of the control trained as long. Alpha is the tokens
    each run actually trained on over D (budgets are rounded up to whole steps), not the nominal grid value."""
    alphas, ppls = [p["uptrain_tokens"] / D for p in points], [p["ppl"] for p in points]
    fixed = crossing(alphas, ppls, [(1 + TOLERANCE) * mha_ppl] * len(alphas))
    by_alpha = {c["alpha"]: c["ppl"] for c in control}
    shared = [p for p in points if p["alpha"] in by_alpha]
    vs_control = crossing(
        [p["uptrain_tokens"] / D for p in shared],
        [p["ppl"] for p in shared],
        [(1 + TOLERANCE) * by_alpha[p["alpha"]] for p in shared],
    )
    return {"vs_original": fixed, "vs_control": vs_control}


def run_llama(args, log: Log) -> dict:
    data, test = default_data(args.data), default_test(args.test, default_data(args.data))
    grid = QUICK_GRID if args.quick else GRID
    extend = [] if args.quick else [a for a in EXTEND if a <= args.max_alpha]
    cfg = llama_config(args.quick, grid, args.seed)
    methods, notes = available_methods(["mean", "calibrated"])
    if "calibrated" not in methods:
        raise SystemExit("error: the calibrated method is not registered: " + "; ".join(notes))
    work = args.work / f"replicate-{_work_key(cfg, data)}"
    runner = Runner(cfg, data, test, work, log, args.fresh, keep_models=True, quiet=True)
    runner.prepare()
    pre = runner.pretrain()
    D = pre["tokens"]
    goal = (1 + TOLERANCE) * pre["ppl"]
    control_max = args.control_max_alpha if not args.quick else max(grid)
    control = {0.0: {"alpha": 0.0, "ppl": pre["ppl"], "uptrain_tokens": 0}}
    whole = args.quick or args.whole_grid
    curves, cross = {}, {}
    for start in STARTS:
        points: list[dict] = []
        for a in grid + extend:
            if a <= control_max and a not in control:
                control[a] = control_rows(runner, [a], D, args.seed, pre)[-1]
            points = curve(points + start_rows(runner, start, [a], D, args.seed, args.kd_weight))
            c = crossings(points, pre["ppl"], list(control.values()), D)
            reached = c["vs_original"]["alpha"] is not None
            reached_control = c["vs_control"]["alpha"] is not None or a >= control_max
            if not whole and reached and reached_control:
                break  # the grid points above the crossing cost tokens and change no crossing
            if a == grid[-1] and not reached and extend:
                log(
                    f"llama: {start} not within {TOLERANCE:.0%} by {pct(a)}: extending to {', '.join(map(pct, extend))}"
                )
            if a >= grid[-1] and reached and not whole:
                break  # the extension stops once reached
        curves[start] = points
        cross[start] = crossings(points, pre["ppl"], list(control.values()), D)
        c = cross[start]["vs_original"]
        log(
            f"llama: {start:<14} "
            + ", ".join(f"{pct(p['alpha'])} {p['ppl']:.2f}" for p in points)
            + f" -> within {TOLERANCE:.0%} at alpha {pct(c['alpha'])} ({c['how']})"
        )
    control = curve(list(control.values()))
    log(
        f"llama: MHA {pre['ppl']:.2f}, goal {goal:.2f}; control "
        + ", ".join(f"{pct(c['alpha'])} {c['ppl']:.2f}" for c in control)
    )
    for folder in (work / "converted").glob("g1-*"):
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "model": f"llama {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads (MHA) -> MQA",
        "parameters": pre["parameters"],
        "heads": cfg.num_heads,
        "pretraining_tokens": D,
        "mha_ppl": pre["ppl"],
        "goal_ppl": goal,
        "eval": runner.eval_info,
        "config": dataclasses.asdict(cfg),
        "kd": {"kd_weight": args.kd_weight, "kd_temperature": 1.0, "teacher": "the MHA original"},
        "control": control,
        "curves": curves,
        "crossing": cross,
        "work": str(work),
        "cells_reused": runner.reused,
    }


def _work_key(cfg: Config, data: Path) -> str:
    from replication_setup import work_hash

    return work_hash(cfg, data)


# ============================================================================================== SmolLM2


def smollm2_settings(args, model: Path, out: Path, valid: Path, test: Path, steps: int, teacher: Path | None) -> dict:
    return {
        "model": str(model),
        "output_dir": str(out),
        "data": str(valid),
        "validation": str(test),
        "max_eval_blocks": args.smollm2_eval_blocks,
        "block_size": 512,
        "micro_batch_size": 1,
        "grad_accum": 1,
        "seed": args.seed,
        "max_steps": steps,
        "pretraining_tokens": SMOLLM2_PRETRAIN_TOKENS,
        "train": "full",
        "lr": 3e-4,
        "warmup_steps": 1,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "model_dtype": "float32",
        "eval_every": args.smollm2_eval_every,
        "save_every": 0,
        "resume": "never",
        "report_to": "none",
        **({"teacher": str(teacher), "kd_weight": args.kd_weight} if teacher is not None else {}),
    }


def smollm2_run(settings: dict, work: Path, name: str, fresh: bool, log: Log) -> dict:
    """One uptraining run (cached by its settings): its validation curve and timing."""
    from convert.uptrain import Options, make_settings, uptrain

    keyed = {k: v for k, v in settings.items() if k != "output_dir"}
    cache = work / f"run-{name}-{short_hash(keyed)}.json"
    if cache.is_file() and not fresh:
        log(f"smollm2: {name}: reused {cache.name}")
        return json.loads(cache.read_text())
    out = Path(settings["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    summary = dict(uptrain(make_settings(settings), Options(quiet=True)))
    seconds = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [{"tokens": r["tokens"], "ppl": r["val_ppl"]} for r in rows if r["kind"] == "eval"]
    result = {"curve": evals, "tokens": summary["tokens"], "steps": summary["steps"], "seconds": seconds}
    shutil.rmtree(out, ignore_errors=True)
    cache.write_text(json.dumps(result, indent=2))
    log(f"smollm2: {name}: " + ", ".join(f"{e['tokens']:,} tok {e['ppl']:.2f}" for e in evals) + f" ({seconds:.0f} s)")
    return result


def run_smollm2(args, log: Log) -> dict:
    from convert import convert_checkpoint
    from convert.demo.smollm2 import materialize

    valid = default_data(args.data)
    test = default_test(args.test, valid)
    original = materialize()
    work = args.work / "efficiency-smollm2"
    work.mkdir(parents=True, exist_ok=True)
    starts = {}
    for method in ("mean", "calibrated"):
        folder = work / f"mqa-{method}"
        if not (folder / "config.json").is_file():
            options = None
            if method == "calibrated":
                options = {"calibration_data": str(valid), "calibration_tokens": 8192, "calibration_seq_len": 512}
            t0 = time.time()
            convert_checkpoint(original, folder, 1, method, overwrite=True, progress=False, method_options=options)
            log(f"smollm2: converted to MQA with {method} in {time.time() - t0:.0f} s")
        starts[method] = folder
    steps = max(1, args.smollm2_tokens // 512)
    # the control: the original trained on as long (its step-0 evaluation is the original's perplexity)
    s = smollm2_settings(args, original, work / "up-control", valid, test, steps, None)
    control = smollm2_run(s, work, "control", args.fresh, log)
    original_ppl = control["curve"][0]["ppl"]
    goal = (1 + TOLERANCE) * original_ppl
    control_at = {c["tokens"]: c["ppl"] for c in control["curve"]}
    runs = {}
    for start in STARTS:
        model = starts["calibrated" if start == "calibrated+kd" else start]
        teacher = original if start == "calibrated+kd" else None
        s = smollm2_settings(args, model, work / f"up-{start}", valid, test, steps, teacher)
        r = smollm2_run(s, work, start.replace("+", "-"), args.fresh, log)
        tokens = [c["tokens"] for c in r["curve"]]
        ppls = [c["ppl"] for c in r["curve"]]
        r["first_within"] = first_within(tokens, ppls, goal)
        shared = [c for c in r["curve"] if c["tokens"] in control_at]
        r["first_within_control"] = first_within(
            [c["tokens"] for c in shared],
            [c["ppl"] for c in shared],
            [(1 + TOLERANCE) * control_at[c["tokens"]] for c in shared],
        )
        r["final_ppl"] = ppls[-1]
        r["fraction_of_pretraining"] = r["tokens"] / SMOLLM2_PRETRAIN_TOKENS
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        runs[start] = r
    return {
        "model": "SmolLM2-135M-Instruct (float32, real weights), GQA-3 -> MQA",
        "pretraining_tokens": SMOLLM2_PRETRAIN_TOKENS,
        "pretraining_tokens_source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M (model card: 2T tokens)",
        "eval": f"convert.uptrain validation: the first {args.smollm2_eval_blocks} blocks of 512 tokens of {test.name}",
        "eval_blocks": args.smollm2_eval_blocks,
        "original_ppl": original_ppl,
        "goal_ppl": goal,
        "control": control,
        "recipe": "lr 3e-4, warmup 1 step, cosine to 0.1 x lr, 1 block of 512 tokens per step, AdamW, wd 0.1, clip 1.0",
        "runs": runs,
    }


# ============================================================================================== tables


def _alpha_cell(c: dict) -> str:
    if c["alpha"] is None:
        return f"not reached by {pct(c['between'][1])}"
    if c["how"] == "interpolated":
        return f"**{pct(c['alpha'])}** (log-interpolated, {pct(c['between'][0])}-{pct(c['between'][1])})"
    if c["how"] == "at most":
        return f"**≤ {pct(c['alpha'])}** (already at the first trained point)"
    return f"**{pct(c['alpha'])}** ({c['how']})"


def summary_table(results: dict) -> dict:
    cols = [
        "study",
        "model",
        "measure",
        "start",
        "before uptraining",
        "uptraining to within 5% of the original (α)",
        "α against the control trained as long",
        "tokens (α × D)",
    ]
    rows = [
        [f"[{a['study']}]({a['link']})", a["model"], a["measure"], a["start"], "-"]
        + [f"{a['reached']}: **{a['fraction']}**", "-", "-"]
        for a in ANCHORS
    ]
    names = {"mean": "mean", "calibrated": "calibrated", "calibrated+kd": "calibrated + distillation"}
    if "llama" in results:
        L = results["llama"]
        model = f"replication llama, {L['parameters'] / 1e6:.1f}M, {L['heads']} → 1 KV heads"
        model += f", D = {L['pretraining_tokens']:,}"
        measure = f"WikiText-2 test perplexity (MHA {L['mha_ppl']:.2f}, goal {L['goal_ppl']:.2f})"
        for start in STARTS:
            pts, c = L["curves"][start], L["crossing"][start]
            vo, vc = c["vs_original"], c["vs_control"]
            tokens = "-" if vo["alpha"] is None else f"{vo['alpha'] * L['pretraining_tokens']:,.0f}"
            rows.append(["this project", model, measure, names[start], f"{pts[0]['ppl']:.2f}"]
                        + [_alpha_cell(vo), _alpha_cell(vc), tokens])  # fmt: skip
    if "smollm2" in results:
        S = results["smollm2"]
        measure = (
            f"perplexity, {S['eval_blocks']} × 512 WikiText-2 test tokens "
            f"(original {S['original_ppl']:.2f}, goal {S['goal_ppl']:.2f})"
        )
        for start in STARTS:
            r = S["runs"][start]
            if r["first_within"] is None:
                reached = (
                    f"not reached within {r['tokens']:,} tokens (α = {r['fraction_of_pretraining']:.1e}): "
                    f"{r['final_ppl']:,.2f} at the end"
                )
            else:
                reached = (
                    f"reached at {r['first_within']:,} tokens (α = {r['first_within'] / S['pretraining_tokens']:.1e})"
                )
            model = "SmolLM2-135M-Instruct, 3 → 1 KV heads, D = 2T (model card)"
            before = f"{r['curve'][0]['ppl']:,.2f}"
            w = r["first_within_control"]
            vs_control = f"reached at {w:,} tokens" if w is not None else f"not reached within {r['tokens']:,} tokens"
            rows.append(
                ["this project", model, measure, names[start], before, reached, vs_control, f"{r['tokens']:,} trained"]
            )
    return {"columns": cols, "rows": rows}


def curves_table(results: dict) -> dict:
    """Perplexity against the nominal alpha, one row per start point and the control, and the tokens trained."""
    L = results["llama"]
    series = {"MHA control (trained on)": L["control"], **L["curves"]}
    alphas = sorted({p["alpha"] for pts in series.values() for p in pts})
    cols = ["llama MQA, test perplexity", *[f"α = {pct(a)}" for a in alphas]]
    tokens = {p["alpha"]: p["uptrain_tokens"] for pts in series.values() for p in pts}
    step = f"{L['config']['micro_batch_size']} × {L['config']['block_size']}"
    rows = [[f"uptraining tokens (whole steps of {step})", *[f"{tokens[a]:,}" for a in alphas]]]
    for name, pts in series.items():
        by = {p["alpha"]: p["ppl"] for p in pts}
        rows.append([name, *[f"{by[a]:.2f}" if a in by else "-" for a in alphas]])
    return {"columns": cols, "rows": rows}


def smollm2_curves_table(results: dict) -> dict:
    S = results["smollm2"]
    tokens = sorted({c["tokens"] for r in S["runs"].values() for c in r["curve"]})
    cols = ["SmolLM2 MQA, validation perplexity", *[f"{t:,} tokens" for t in tokens]]
    by = {c["tokens"]: c["ppl"] for c in S["control"]["curve"]}
    rows = [["original, trained on (control)", *[f"{by[t]:,.2f}" if t in by else "-" for t in tokens]]]
    for name, r in S["runs"].items():
        by = {c["tokens"]: c["ppl"] for c in r["curve"]}
        rows.append([name, *[f"{by[t]:,.2f}" if t in by else "-" for t in tokens]])
    return {"columns": cols, "rows": rows}


# ============================================================================================== main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default="llama,smollm2", help="llama, smollm2 or both (comma-separated)")
    p.add_argument("--quick", action="store_true", help="smoke run: the tiny replication llama, alphas 0, 1%%, 5%%")
    p.add_argument("--output", help="results JSON (default: bench/results/efficiency-COMMIT[-quick].json)")
    p.add_argument("--work", help="cache folder (default: $GQA_CONVERT_CACHE or ~/.cache/gqa-convert)")
    p.add_argument("--fresh", action="store_true", help="recompute cached cells and runs")
    p.add_argument("--data", help="training text (default: $GQA_DATA_DIR/wikitext-2/valid.txt)")
    p.add_argument("--test", help="held-out text (default: test.txt beside --data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kd-weight", type=float, default=0.5, help="distillation weight (convert.uptrain kd_weight)")
    p.add_argument(
        "--whole-grid",
        action="store_true",
        help="run every grid alpha for every start (default: a start stops at its first alpha within the goal)",
    )
    p.add_argument("--max-alpha", type=float, default=1.0, help="largest alpha --extend may run (default 1.0)")
    p.add_argument("--control-max-alpha", type=float, default=0.5, help="largest alpha the MHA control is run at")
    p.add_argument("--smollm2-tokens", type=int, default=10240, help="uptraining tokens per SmolLM2 run")
    p.add_argument("--smollm2-eval-every", type=int, default=5, help="validation every N steps (512 tokens each)")
    p.add_argument("--smollm2-eval-blocks", type=int, default=4, help="validation blocks of 512 test tokens")
    p.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("llama", "smollm2")]
    if bad or not parts:
        print(f"error: --parts takes llama and/or smollm2, got {args.parts!r}", file=sys.stderr)
        return 2
    if args.quick:
        parts = ["llama"]
    cache = Path(os.environ.get("GQA_CONVERT_CACHE", Path.home() / ".cache" / "gqa-convert"))
    args.work = Path(args.work) if args.work else cache
    try:
        default_test(args.test, default_data(args.data))
    except SystemExit as e:
        print(e.code, file=sys.stderr)
        return 2
    prov = provenance(argv)
    code = code_digests()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # a shared CPU: one thread (see docs/replication.md)
    log = Log(args.quiet, args.json)
    start = time.time()
    load_start = os.getloadavg()
    results: dict = {"quick": args.quick, "tolerance": TOLERANCE, "anchors": ANCHORS}
    if "llama" in parts:
        results["llama"] = run_llama(args, log)
    if "smollm2" in parts:
        results["smollm2"] = run_smollm2(args, log)
    results["table"] = summary_table(results)
    if "llama" in results:
        results["curves_table"] = curves_table(results)
    if "smollm2" in results:
        results["smollm2_curves_table"] = smollm2_curves_table(results)
    results.update(
        hardware=hardware(1),
        load_average_start=load_start,
        load_average_end=os.getloadavg(),
        wall_seconds=time.time() - start,
        code=code,
        provenance=prov,
    )
    commit = prov["commit"].replace("+dirty", "")
    out = Path(args.output) if args.output else RESULTS / f"efficiency-{commit}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"done in {time.time() - start:.0f} s: {out}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
