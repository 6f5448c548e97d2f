"""The plan's memory estimate against the peak the run measured (CPU RSS), on real SmolLM2 weights and on a
synthetic 1.1B llama; MFU in the metrics from the peak_tflops setting; the estimate's arithmetic by parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert.uptrain.memory import estimate_memory, mfu, shape_of
from tests.helpers.uptrain import REPO, ok, recipe_env, toy_documents, train_tokenizer, write_corpus

RECIPE = REPO / "recipes" / "uptrain.py"
TOLERANCE = 0.25  # |estimate - measured peak| / measured peak
QUICK = ["max_steps=2", "eval_every=0", "save_every=0", "max_eval_blocks=1", "report_to=none", "--quiet"]


def run(args: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, str(RECIPE), *args], capture_output=True, text=True, env=recipe_env(), cwd=REPO, timeout=900
    )
    ok(result)
    out = next(Path(a.split("=", 1)[1]) for a in args if a.startswith("output_dir="))
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "train": [r for r in rows if r["kind"] == "train"]}


def relative_error(summary: dict) -> float:
    estimate, measured = summary["memory_estimate"]["total"], summary["peak_memory_mib"] * 2**20
    print(f"estimate {estimate / 2**20:.0f} MiB, measured peak RSS {measured / 2**20:.0f} MiB")  # shown with -s
    return abs(estimate - measured) / measured


def synthetic_llama(folder: Path, tokenizer) -> Path:
    """A 1.1B llama (TinyLlama's shape) in bfloat16, written shard by shard from seeded random tensors so that the
    test process never holds the whole model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True)
    generator, index, shard, shard_bytes, n = torch.Generator().manual_seed(0), {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard, shard_bytes, n = {}, 0, n + 1

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[key], shard_bytes = tensor, shard_bytes + tensor.numel() * 2
        if shard_bytes > 300 * 2**20:
            flush()
    if shard:
        flush()
    total = sum(s.numel() * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_estimate_within_25_percent_of_the_measured_peak_for_smollm2(tmp_path, smollm2_path, wikitext_valid):
    head = "\n".join(wikitext_valid.read_text(encoding="utf-8").splitlines()[:400])
    data = tmp_path / "valid-head.txt"
    data.write_text(head, encoding="utf-8")
    got = run(
        [
            f"model={smollm2_path}",
            f"data={data}",
            f"output_dir={tmp_path / 'run'}",
            "block_size=32",
            "micro_batch_size=2",
            "peak_tflops=1",
            "validation_fraction=0.3",
            *QUICK,
        ]
    )
    summary = got["summary"]
    assert summary["memory_estimate"]["training"] >= summary["memory_estimate"]["loading"]  # full training: optimizer
    assert relative_error(summary) <= TOLERANCE, (summary["memory_estimate"], summary["peak_memory_mib"])
    for row in got["train"]:  # MFU: 6 N tokens/s over 1 TFLOP/s
        assert row["peak_memory_mib"] > 0
        if row["tokens_per_s"]:
            assert row["mfu"] == pytest.approx(6 * summary["total_params"] * row["tokens_per_s"] / 1e12)
        else:
            assert row["mfu"] is None


@pytest.mark.slow
def test_estimate_within_25_percent_of_the_measured_peak_for_a_1b_model(tmp_path):
    docs = toy_documents(80)
    tok = train_tokenizer(docs)
    model = synthetic_llama(tmp_path / "llama-1b", tok)
    got = run(
        [
            f"model={model}",
            f"data={write_corpus(tmp_path / 'corpus.txt', docs)}",
            f"output_dir={tmp_path / 'run'}",
            "model_dtype=bfloat16",
            "train=attention",
            "block_size=16",
            "micro_batch_size=1",
            *QUICK,
        ]
    )
    summary = got["summary"]
    assert 1.0e9 < summary["total_params"] < 1.2e9
    assert relative_error(summary) <= TOLERANCE, (summary["memory_estimate"], summary["peak_memory_mib"])


def test_the_estimate_by_parts():
    """Sharding divides weights, gradients and optimizer state; checkpointing keeps one block's activations."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, vocab_size=100)
    common = dict(
        total_params=1000,
        trainable_params=400,
        teacher_params=0,
        teacher_vocab=0,
        model_dtype="float32",
        mixed_precision=None,
        micro_batch_size=2,
        row_tokens=8,
        gradient_checkpointing=False,
    )
    one = estimate_memory(config, processes=1, sharded=False, **common)
    assert (one.weights, one.gradients, one.optimizer) == (4000, 1600, 3200)
    two = estimate_memory(config, processes=2, sharded=True, **common)
    assert (two.weights, two.gradients, two.optimizer) == (2000, 800, 1600)
    ddp = estimate_memory(config, processes=2, sharded=False, **common)
    assert ddp.weights == one.weights
    per_block = (10 * 64 + 4 * 128) * 16 * 4
    assert one.activations == 4 * per_block
    assert one.activations_checkpointed == 4 * 64 * 16 * 4 + per_block
    assert one.logits == 4 * 16 * 100 * 4
    assert shape_of(config) == {"hidden": 64, "intermediate": 128, "layers": 4, "vocab": 100}
    assert mfu(6e9, 100.0, 1.0, 2) == pytest.approx(0.3)
    assert mfu(6e9, None, 1.0, 1) is None and mfu(6e9, 100.0, None, 1) is None
