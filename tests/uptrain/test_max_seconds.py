"""`max_seconds` / `min_steps`: the wall clock on top of the budget (the demo's minute of uptraining)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.uptrain import losses, ok, rows, run_recipe, tiny_llama, toy_documents, train_tokenizer, write_corpus

# 8 planned steps of 2 blocks x 32 tokens; a constant lr after warmup, as the demo runs
ARGS = ["block_size=32", "micro_batch_size=2", "lr=3e-3", "warmup_steps=1", "min_lr_ratio=1", "max_steps=8",
        "max_eval_blocks=4", "eval_every=4", "save_every=0", "report_to=none", "--quiet", "--json"]  # fmt: skip


@pytest.mark.slow  # two tiny training runs in subprocesses
def test_max_seconds_stops_after_min_steps_with_the_uninterrupted_losses(tmp_path):
    """A run stopped by the clock is the uninterrupted run's first steps, evaluated and saved as at the end; its
    summary counts the steps done. Here the clock is spent at once, so the run stops exactly at min_steps."""
    from transformers import AutoModelForCausalLM

    docs = toy_documents(120)
    model = tiny_llama(train_tokenizer(docs), tmp_path / "model")
    common = [*ARGS, f"model={model}", f"data={write_corpus(tmp_path / 'corpus.txt', docs)}"]
    full = ok(run_recipe([*common, f"output_dir={tmp_path / 'full'}", "max_seconds=1e6"]))
    clock = ok(run_recipe([*common, f"output_dir={tmp_path / 'clock'}", "max_seconds=1e-6", "min_steps=3"]))
    done, ref = json.loads(clock.stdout), json.loads(full.stdout)
    assert (ref["steps"], ref["planned_steps"], ref["stopped_early"]) == (8, 8, False)
    assert (done["steps"], done["planned_steps"], done["stopped_early"]) == (3, 8, True)
    assert done["tokens"] == done["data_sources"][0]["tokens"] == 3 * 2 * 32
    expected, got = losses(tmp_path / "full"), losses(tmp_path / "clock")
    assert sorted(got) == [1, 2, 3] and all(abs(got[s] - expected[s]) <= 1e-6 for s in got), (got, expected)
    assert [r["step"] for r in rows(tmp_path / "clock", "eval")] == [0, 3] and done["final_eval"]["step"] == 3
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "clock" / "model").config.num_key_value_heads == 1
