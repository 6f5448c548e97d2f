#!/usr/bin/env python
"""Benchmark uptraining's data path against what training consumes, side by side in one run.

    GQA_DATA_DIR=../shared/data python bench/bench_data.py            # SmolLM2-135M, WikiText-2 valid + test
    GQA_DATA_DIR=../shared/data python bench/bench_data.py --steps 4  # quicker

Measured (SmolLM2's tokenizer and weights, WikiText-2's valid and test files as the corpus):

  delivery   tokens/s the streamed data path delivers to one process (tokenize + pack + batch) with 0, 1 and
             2 DataLoader workers, consumed as fast as it comes (`stream_batches` + `make_loader`, the loop's own)
  training   tokens/s one SmolLM2 training step consumes on this CPU (the recipe, `accelerate`-free single process),
             streamed with num_workers=0 and the default 1, and in memory from the token cache; the fraction of
             step time the training thread waited on data (training_summary.json's data_wait_fraction)
  floor      a minimal hand-written torch loop (AdamW, the same model, dtype, blocks and batch) against the recipe
  shares     documents each process tokenizes, as a fraction of the corpus: the token cache built by N simulated
             processes (threads) and the stream split in N parts, N = 1, 2, 8, 32 (before: every process, 1.0)
  cache      the data preparation of a second run (warm cache) against the first (cold)

Computed: what the shipped 7B config needs per process, 6 N D at a stated MFU on H100s, against the delivery.
Timing on a shared CPU is noisy: every ratio is of numbers taken in this one run. Results go to
bench/results/data-<commit>.json with the command, the commit and the machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H100_BF16_FLOPS = 989e12  # dense bf16 peak
MFU = 0.40
LLAMA_7B_PARAMS = 6.74e9
SEVEN_B = {"processes": 32, "block_size": 4096, "micro_batch_size": 4, "grad_accum": 8}  # llama-7b-fsdp.yaml


def corpus() -> list[str]:
    root = Path(os.environ.get("GQA_DATA_DIR", REPO.parent / "shared" / "data")) / "wikitext-2"
    files = [root / "valid.txt", root / "test.txt"]
    if not all(f.is_file() for f in files):
        raise SystemExit(f"error: WikiText-2 not found under {root}: set GQA_DATA_DIR to the shared data folder")
    return [str(f) for f in files]


def settings(model: Path, work: Path, files: list[str], **extra):
    from convert.uptrain.settings import make_settings

    values = {"model": str(model), "output_dir": str(work / "out"), "data": files, "max_steps": 1}
    values.update(block_size=512, micro_batch_size=4, grad_accum=1, save_every=0, data_cache=str(work / "cache"))
    values.update(extra)
    return make_settings(values)


def delivery(model, tokenizer, work, files, workers: int, batches: int) -> float:
    """Tokens/s the streamed path hands one process, batches taken as fast as they come (after the first)."""
    from convert.uptrain.batches import prepare_data, stream_batches
    from convert.uptrain.loader import make_loader

    s = settings(model, work, files, streaming=True, num_workers=workers)
    data = prepare_data(s, tokenizer)
    loader = iter(make_loader(stream_batches(s, data, 0, 1, 0, None), workers, 0, batches + 1))
    next(loader)  # worker start-up
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - started
    del loader
    return batches * s.micro_batch_size * s.block_size / seconds


def shares(model, tokenizer, work, files, world: int) -> dict:
    """The largest fraction of the documents one of `world` processes tokenizes: cache build and stream parts."""
    from convert.text import sources as textdata
    from convert.uptrain import batches as updata
    from convert.uptrain import token_cache

    seen: dict[str, int] = {}
    lock, tokenize = threading.Lock(), token_cache._tokenize

    def counting(batch, tokenizer):
        with lock:
            seen[threading.current_thread().name] = seen.get(threading.current_thread().name, 0) + len(batch["text"])
        return tokenize(batch, tokenizer)

    s = settings(model, work / f"shares-{world}", files)
    token_cache._tokenize = counting
    try:

        def one(rank):
            threading.current_thread().name = f"rank-{rank}"
            return updata.prepare_data(s, tokenizer, rank, world)

        with ThreadPoolExecutor(max_workers=world) as pool:
            list(pool.map(one, range(world)))
    finally:
        token_cache._tokenize = tokenize
    total = sum(seen.values())

    def part_documents(part: int) -> int:
        stream = textdata.PackedStream(
            lambda: textdata.load_text_dataset(files, streaming=True),
            tokenizer,
            512,
            16,
            0,
            0.05,
            part=part,
            parts=world,
        )
        return sum(1 for _ in stream._epoch_documents())

    parts = [part_documents(p) for p in range(world)]
    return {
        "processes": world,
        "cache_documents_total": total,
        "cache_largest_share": max(seen.values()) / total,
        "stream_documents_total": sum(parts),
        "stream_largest_share": max(parts) / sum(parts),
        "ideal_share": 1 / world,
    }


def cache_ratio(model, tokenizer, work, files) -> dict:
    from convert.uptrain.batches import prepare_data

    s = settings(model, work / "warm", files, max_eval_blocks=1)
    started = time.perf_counter()
    cold = prepare_data(s, tokenizer)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    warm = prepare_data(s, tokenizer)
    warm_s = time.perf_counter() - started
    assert not cold["sources"][0]["cache"]["hit"] and warm["sources"][0]["cache"]["hit"]
    return {"cold_s": cold_s, "warm_s": warm_s, "warm_over_cold": warm_s / cold_s}


BLOCK, MICRO = 128, 2  # SmolLM2's training steps here: 2 blocks of 128 tokens (a loaded 2-core CPU is slow)


def recipe(model, work, files, name: str, steps: int, *extra: str) -> dict:
    """The recipe on one process: its tokens/s from the end of step 1 and its data wait fraction."""
    out = work / name
    args = [f"model={model}", f"output_dir={out}", "data=[" + ",".join(files) + "]", f"max_steps={steps}"]
    args += [f"block_size={BLOCK}", f"micro_batch_size={MICRO}", "eval_every=0", "save_every=0", "max_eval_blocks=1"]
    args += ["report_to=none", f"data_cache={work / 'cache'}", "lr=1e-5", "warmup_steps=0", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "convert.uptrain", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the recipe failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in train if r["kind"] == "train"][-1]
    return {"tokens_per_s": last["tokens_per_s"], "data_wait_fraction": summary["data_wait_fraction"]}


MINIMAL = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from convert.uptrain.settings import make_settings
from convert.uptrain.batches import prepare_data, step_batches
model_dir, steps, cfg = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
s = make_settings(cfg)
batches = step_batches(s, prepare_data(s, AutoTokenizer.from_pretrained(model_dir)), 0, 1)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.config.use_cache = False
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
for step in range(1, steps + 1):
    if step == 2:
        started = time.perf_counter()
    ids = batches[step]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"tokens_per_s": (steps - 1) * ids.numel() / (time.perf_counter() - started)}))
"""


def minimal_loop(model, work, files, steps: int) -> dict:
    cfg = {"model": str(model), "output_dir": str(work / "minimal"), "data": files, "max_steps": steps}
    cfg.update(block_size=BLOCK, micro_batch_size=MICRO, max_eval_blocks=1, data_cache=str(work / "cache"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", MINIMAL, str(model), str(steps), json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: the minimal loop failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps per recipe run (the first is not timed)")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per delivery measurement")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/data-COMMIT.json)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    from transformers import AutoTokenizer

    from convert.demo import smollm2

    datasets.disable_progress_bars()
    files = corpus()
    model = smollm2.materialize()
    tokenizer = AutoTokenizer.from_pretrained(model)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit.stdout.strip(),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="gqa-bench-data-") as tmp:
        work = Path(tmp)
        print("delivery (streamed, tokens/s per process) ...", flush=True)
        result["delivery_tokens_per_s"] = {
            str(w): delivery(model, tokenizer, work / f"d{w}", files, w, args.batches) for w in (0, 1, 2)
        }
        print(json.dumps(result["delivery_tokens_per_s"]), flush=True)
        print("shares of the tokenization ...", flush=True)
        result["shares"] = [shares(model, tokenizer, work, files, n) for n in (1, 2, 8, 32)]
        print("cold and warm cache ...", flush=True)
        result["cache"] = cache_ratio(model, tokenizer, work, files)
        print(json.dumps(result["cache"]), flush=True)
        print("training (SmolLM2 on this CPU) ...", flush=True)
        training = {
            "streamed_workers_0": recipe(model, work, files, "s0", args.steps, "streaming=true", "num_workers=0"),
            "streamed_workers_1": recipe(model, work, files, "s1", args.steps, "streaming=true"),
            "in_memory_workers_1": recipe(model, work, files, "m1", args.steps),
            "minimal_torch_loop": minimal_loop(model, work, files, args.steps),
        }
        result["training"] = training
    consumed = training["streamed_workers_1"]["tokens_per_s"]
    result["ratios"] = {
        "delivery_1_worker_over_smollm2_consumption": result["delivery_tokens_per_s"]["1"] / consumed,
        "smollm2_wait_fraction_default_workers_streamed": training["streamed_workers_1"]["data_wait_fraction"],
        "smollm2_wait_fraction_default_workers_in_memory": training["in_memory_workers_1"]["data_wait_fraction"],
        "smollm2_wait_fraction_0_workers_streamed": training["streamed_workers_0"]["data_wait_fraction"],
        "warm_over_cold_preparation": result["cache"]["warm_over_cold"],
        "recipe_over_minimal_loop": training["in_memory_workers_1"]["tokens_per_s"]
        / training["minimal_torch_loop"]["tokens_per_s"],
    }
    per_gpu = H100_BF16_FLOPS * MFU / (6 * LLAMA_7B_PARAMS)  # tokens/s one 7B process trains on
    step_tokens = SEVEN_B["processes"] * SEVEN_B["micro_batch_size"] * SEVEN_B["grad_accum"] * SEVEN_B["block_size"]
    result["llama_7b"] = {
        "assumed": f"H100 bf16 {H100_BF16_FLOPS:.3g} FLOP/s at {MFU:.0%} MFU, N = {LLAMA_7B_PARAMS:.3g}, 6 N D",
        "tokens_per_step": step_tokens,
        "step_seconds": step_tokens / (per_gpu * SEVEN_B["processes"]),
        "consumed_per_process_tokens_per_s": per_gpu,
        "tokenized_per_process_before": per_gpu * SEVEN_B["processes"],  # every process tokenized the whole batch
        "delivery_1_worker_over_need": result["delivery_tokens_per_s"]["1"] / per_gpu,
        "delivery_1_worker_over_need_before": result["delivery_tokens_per_s"]["1"] / (per_gpu * SEVEN_B["processes"]),
    }
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = args.out or REPO / "bench" / "results" / f"data-{result['commit']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
