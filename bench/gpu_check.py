"""The GPU check (bench/gpu_check.sh runs it): the four measurements a lent GPU is for, as one JSON file.

    python bench/gpu_check.py --device cuda        # on one GPU, about 5 minutes (8 at most: the .sh's timeout)
    python bench/gpu_check.py --device cpu         # dry mode: every step, shortened, on CPU (tiny sizes)

1. calibration: SmolLM2 converted to MQA with `--method calibrated --device cuda` and `--device cpu`; the two
   outputs' WikiText-2 perplexities agree within 1%.
2. uptraining: the SmolLM2 MQA model trained 50 steps in bf16 with sdpa on the GPU (tokens/s, MFU, peak memory)
   and the same 50 steps in float32 on the CPU; the loss curves agree (largest gap per step, reported).
3. FSDP2 on one GPU: recipes/accelerate_fsdp.yaml with 1 process, a few steps, the model written and reloadable.
4. decode: `gqa-convert eval` of the original against the MQA model, tokens/s at 4 context lengths.

Every step records its command, wall seconds and numbers, and whether it passed; a failed step does not stop
the others. Written to bench/results/gpu-<commit>.json (dry mode: gpu-<commit>-dry-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# full run (GPU) / dry run (CPU): the sizes of each step
SIZES = {
    "cuda": dict(
        calib_tokens=8192,
        windows=16,
        window=512,
        steps=50,
        block=256,
        micro=8,
        fsdp_steps=10,
        contexts="256,1024,2048,4096",
        new_tokens=64,
    ),
    "cpu": dict(
        calib_tokens=256,
        windows=2,
        window=64,
        steps=3,
        block=32,
        micro=2,
        fsdp_steps=2,
        contexts="16,32,64,128",
        new_tokens=4,
    ),
}
LOSS_GAP = 0.05  # bf16 on the GPU against float32 on the CPU: largest per-step loss difference allowed


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() or "unknown"


def sh(command: list[str], env: dict | None = None, timeout: int = 480) -> tuple[subprocess.CompletedProcess, float]:
    """Run one command of the check; its result and wall seconds (stderr kept for the report)."""
    started = time.time()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=full_env, timeout=timeout)
    return result, time.time() - started


def failed(result: subprocess.CompletedProcess) -> str | None:
    return None if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip()[-1500:]}"


def eval_json(models: list[str], data: Path, size: dict, device: str, contexts: str = "") -> tuple[dict, list]:
    cmd = ["gqa-convert", "eval", *models, "--data", str(data), "--window", str(size["window"])]
    cmd += ["--max-windows", str(size["windows"]), "--contexts", contexts, "--device", device, "--json"]
    cmd += ["--new-tokens", str(size["new_tokens"])]
    result, seconds = sh(cmd)
    rows = json.loads(result.stdout[result.stdout.index("[") :]) if result.returncode == 0 else []
    return {"command": " ".join(cmd), "seconds": seconds, "error": failed(result)}, rows


def step_calibration(smol: Path, work: Path, data: Path, size: dict, device: str) -> dict:
    outs, report = {}, {}
    for where in dict.fromkeys([device, "cpu"]):  # dry mode: the CPU path once
        out = work / f"calibrated-{where}"
        cmd = ["gqa-convert", "convert", str(smol), str(out), "-g", "1", "--method", "calibrated"]
        cmd += ["--device", where, "--calibration-data", str(data), "--calibration-tokens", str(size["calib_tokens"])]
        result, seconds = sh(cmd)
        report[f"convert_{where}"] = {"command": " ".join(cmd), "seconds": seconds, "error": failed(result)}
        outs[where] = out
    scored, rows = eval_json([str(p) for p in outs.values()], data.with_name("validation.txt"), size, device)
    report["eval"] = scored
    if rows:
        ppl = {where: row["perplexity"] for where, row in zip(outs, rows)}
        report["perplexity"] = ppl
        report["relative_difference"] = abs(ppl[device] - ppl["cpu"]) / ppl["cpu"]
        report["passed"] = report["relative_difference"] <= 0.01
    return report


def uptrain(model: Path, out: Path, data: Path, size: dict, steps: int, extra: list[str], launch: list[str]) -> dict:
    """One recipe run on `data` (validated on the held-out file beside it, `validation.txt`)."""
    args = [f"model={model}", f"data={data}", f"validation={data.with_name('validation.txt')}", f"output_dir={out}"]
    args += [f"max_steps={steps}", f"block_size={size['block']}"]
    args += [f"micro_batch_size={size['micro']}", "lr=3e-4", "warmup_steps=2", "eval_every=0", "save_every=0"]
    args += ["max_eval_blocks=4", "report_to=none", "seed=0", "--quiet", *extra]
    cmd = [*launch, str(REPO / "recipes" / "uptrain.py"), *args]
    result, seconds = sh(cmd, env={"PYTHONPATH": str(REPO)})
    report = {"command": " ".join(cmd), "seconds": seconds, "error": failed(result)}
    summary_path = out / "model" / "training_summary.json"
    if result.returncode == 0 and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"]
        report.update(
            tokens_per_s=summary["tokens_per_s"],
            mfu=max((r["mfu"] for r in train if r.get("mfu") is not None), default=None),
            peak_memory_mib=summary["peak_memory_mib"],
            memory_estimate_mib=summary["memory_estimate"]["total"] / 2**20,
            losses=[r["loss"] for r in train],
            final_eval=summary["final_eval"],
        )
    return report


def step_uptraining(mqa: Path, work: Path, data: Path, size: dict, device: str) -> dict:
    python = [sys.executable]
    accel = ["mixed_precision=bf16", "attn_implementation=sdpa"] if device == "cuda" else ["attn_implementation=sdpa"]
    fast = uptrain(mqa, work / f"uptrain-{device}", data, size, size["steps"], accel, python)
    cpu = fast
    if device != "cpu":
        env_cpu = ["CUDA_VISIBLE_DEVICES="]
        cpu = uptrain(mqa, work / "uptrain-cpu", data, size, size["steps"], [], ["env", *env_cpu, *python])
    report = {device: fast, "cpu": cpu} if device != "cpu" else {"cpu": cpu}
    if fast.get("losses") and cpu.get("losses"):
        gap = max(abs(a - b) for a, b in zip(fast["losses"], cpu["losses"]))
        report["largest_loss_gap"] = gap
        report["passed"] = gap <= LOSS_GAP and len(fast["losses"]) == len(cpu["losses"]) == size["steps"]
    return report


def step_fsdp(mqa: Path, work: Path, data: Path, size: dict, device: str) -> dict:
    config = REPO / "recipes" / ("accelerate_fsdp.yaml" if device == "cuda" else "accelerate_fsdp_cpu.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1"]
    report = uptrain(mqa, work / "fsdp", data, size, size["fsdp_steps"], [], launch)
    if report["error"] is None:
        probe = (
            "from transformers import AutoModelForCausalLM as A; m = A.from_pretrained(%r); print(m.num_parameters())"
        )
        result, _ = sh([sys.executable, "-c", probe % str(work / "fsdp" / "model")])
        report["reloaded"] = result.returncode == 0
        report["passed"] = report["reloaded"] and len(report.get("losses", [])) == size["fsdp_steps"]
    return report


def step_decode(smol: Path, mqa: Path, data: Path, size: dict, device: str) -> dict:
    report, rows = eval_json([str(smol), str(mqa)], data, size, device, size["contexts"])
    if rows:
        report["decode"] = {
            f"{i}:{Path(row['model']).name}": [
                {k: d[k] for k in ("context", "tokens_per_s", "speedup_vs_first") if k in d} for d in row["decode"]
            ]
            for i, row in enumerate(rows)
        }
        report["perplexity"] = [row["perplexity"] for row in rows]
        report["passed"] = all(len(row["decode"]) == 4 for row in rows)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", default=None, help="scratch folder (default: a fresh one under /tmp)")
    parser.add_argument("--data", default=None, help="WikiText-2 folder (default: $GQA_DATA_DIR/wikitext-2)")
    args = parser.parse_args()
    device, size = args.device, SIZES[args.device]
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "error: --device cuda but torch sees no GPU: run on a GPU machine, or --device cpu (dry mode)",
                file=sys.stderr,
            )
            return 2
    data_dir = Path(args.data or Path(os.environ.get("GQA_DATA_DIR", REPO.parent / "shared" / "data")) / "wikitext-2")
    if not (data_dir / "valid.txt").is_file():
        print(f"error: no valid.txt in {data_dir}: set GQA_DATA_DIR (the folder holding wikitext-2/)", file=sys.stderr)
        return 2
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    from convert.demo import smollm2

    started = time.time()
    smol = smollm2.materialize()
    # the training text, and the held-out text the runs validate on (uptrain() finds it beside the training text)
    lines = None if device == "cuda" else 600  # dry mode: slices keep tokenizing and training short
    data = work / "train.txt"
    for name, source in (("train.txt", "valid.txt"), ("validation.txt", "test.txt")):
        text = (data_dir / source).read_text(encoding="utf-8")
        (work / name).write_text(text if lines is None else "\n".join(text.splitlines()[:lines]), encoding="utf-8")
    mqa = work / "mqa"
    result, _ = sh(["gqa-convert", "convert", str(smol), str(mqa), "-g", "1"])
    report: dict = {
        "commit": commit(),
        "device": device,
        "dry_run": device == "cpu",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "sizes": size,
    }
    if device == "cuda":
        import torch

        report["machine"]["gpu"] = torch.cuda.get_device_name(0)
        report["machine"]["torch"] = torch.__version__
    report["mean_pool_conversion"] = {"error": failed(result)}
    steps = {
        "calibration": lambda: step_calibration(smol, work, data, size, device),
        "uptraining": lambda: step_uptraining(mqa, work, data, size, device),
        "fsdp_one_device": lambda: step_fsdp(mqa, work, data, size, device),
        "decode": lambda: step_decode(smol, mqa, data, size, device),
    }
    for name, run in steps.items():
        t0 = time.time()
        try:
            report[name] = run()
        except Exception as e:  # one broken step must not hide the others' numbers
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        report[name]["step_seconds"] = time.time() - t0
        print(f"{name}: passed={report[name].get('passed')} ({report[name]['step_seconds']:.0f} s)", flush=True)
    report["seconds"] = time.time() - started
    report["passed"] = all(report[name].get("passed") for name in steps)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"gpu-{report['commit']}{'-dry-cpu' if device == 'cpu' else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} (passed={report['passed']}, {report['seconds']:.0f} s)")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
