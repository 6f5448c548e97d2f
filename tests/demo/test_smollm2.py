"""The real thing: SmolLM2-135M-Instruct (pretrained, 3 KV heads) converted to multi-query attention."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert import convert_checkpoint
from convert.eval.perplexity import perplexity, tokenize_file

WINDOWS, WINDOW = 12, 512


@pytest.mark.slow
def test_smollm2_gqa3_to_mqa_loads_generates_and_is_measured(smollm2_path, wikitext_test, tmp_path, record_property):
    out = tmp_path / "smollm2-mqa"
    report = convert_checkpoint(smollm2_path, out, 1, progress=False)
    assert (
        report.kv_heads_before == 3
        and report.kv_cache_bytes_per_token_after * 3 == report.kv_cache_bytes_per_token_before
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenize_file(tokenizer, str(wikitext_test), WINDOWS * WINDOW + 1)
    ppl = {}
    for name, path in (("original", smollm2_path), ("mqa_mean", out)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        ppl[name] = perplexity(model, ids, WINDOW, max_windows=WINDOWS).ppl
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 576)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 8
    record_property("wikitext2_test_ppl", ppl)
    print(f"\nSmolLM2-135M WikiText-2 test perplexity ({WINDOWS} x {WINDOW} tokens): {json.dumps(ppl)}")
    # The original is the pretrained model (measured 30.09); mean pooling to MQA loses most of its quality.
    assert 25 < ppl["original"] < 35
    assert ppl["mqa_mean"] > 10 * ppl["original"]
    assert torch.isfinite(torch.tensor(ppl["mqa_mean"]))


TOP_KEYS = {"source", "kv_heads", "eval_text", "eval_tokens", "eval_windows", "window", "calibration", "uptraining",
            "prompt", "models", "from_pretrained", "seconds"}  # fmt: skip
ROW_KEYS = {"path", "kv_heads", "perplexity", "completion", "kv_cache_bytes_per_token"}
UPTRAINING_KEYS = {"steps", "tokens", "train_seconds", "max_seconds", "min_steps", "stopped_early", "data", "teacher",
                   "kd_weight", "train", "lr", "block_size", "perplexity_before", "perplexity_after"}  # fmt: skip


@pytest.mark.slow
def test_demo_command_runs_offline_and_uptraining_lowers_the_perplexity(smollm2_path, tmp_path):
    """The README's first command: real weights, converted by mean pooling and by calibration, the calibrated one
    distilled from the original, all reloaded, scored and made to write side by side; the JSON has every field and
    names the folder `from_pretrained` loads. A clock of 1 s stops the uptraining at its floor of steps (the
    demo's `min_steps`), so the test trains exactly what the floor guarantees on a slow machine."""
    from click.testing import CliRunner

    from convert.cli import main
    from convert.demo import format_demo
    from convert.demo.uptraining import BLOCK_SIZE, MIN_STEPS

    args = ["demo", "--output", str(tmp_path / "demo"), "--windows", "1", "--calibration-tokens", "1024"]
    result = CliRunner().invoke(main, [*args, "--uptrain-seconds", "1", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output[result.output.index("{") :])
    assert set(r) == TOP_KEYS and r["kv_heads"] == [3, 1] and r["eval_windows"] == 1
    models = r["models"]
    assert list(models) == ["original", "mean", "calibrated", "uptrained"]
    extra = {"original": set(), "mean": {"convert_seconds"}, "calibrated": {"convert_seconds"}}
    assert all(set(m) == ROW_KEYS | extra.get(name, {"uptrain_seconds"}) for name, m in models.items())
    assert [m["kv_heads"] for m in models.values()] == [3, 1, 1, 1]
    assert [m["kv_cache_bytes_per_token"] for m in models.values()] == [3 * 2 * 30 * 64 * 4] + 3 * [2 * 30 * 64 * 4]
    assert r["calibration"]["calibration_tokens"] == 1024
    up = r["uptraining"]
    assert set(up) == UPTRAINING_KEYS and up["teacher"] == "the original" and up["stopped_early"]
    assert up["steps"] == MIN_STEPS and up["tokens"] == MIN_STEPS * BLOCK_SIZE
    # The story the demo tells: mean pooling loses most of the model, calibration takes much of it back, and
    # distilling from the original takes more back in a few steps.
    ppl = {name: m["perplexity"] for name, m in models.items()}
    print(f"\ndemo perplexity (1 x 512 tokens): {json.dumps(ppl)}; {up['steps']} steps, {up['train_seconds']} s")
    assert ppl["original"] < ppl["calibrated"] < ppl["mean"] / 3, ppl
    assert (up["perplexity_before"], up["perplexity_after"]) == (ppl["calibrated"], ppl["uptrained"])
    assert ppl["original"] < ppl["uptrained"] < 0.95 * ppl["calibrated"], ppl
    # One sentence each: the original's is real text; the converted ones show what the merge kept (may be garbage).
    assert len(models["original"]["completion"].split()) > 3
    assert all(isinstance(m["completion"], str) for m in models.values())
    folder = tmp_path / "demo" / "uptrained" / "model"
    assert r["from_pretrained"] == f'AutoModelForCausalLM.from_pretrained("{folder}")'
    assert models["uptrained"]["path"] == str(folder)
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_key_value_heads == 1
    text = format_demo(r)
    assert f"perplexity {ppl['calibrated']:.2f} -> {ppl['uptrained']:.2f}" in text
    assert f"{MIN_STEPS} steps x {BLOCK_SIZE} tokens" in text and "load the uptrained model:" in text
    assert [line.split()[0] for line in text.splitlines()[3:7]] == list(models)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-kv-heads", "2"], "error: --num-kv-heads 2: SmolLM2-135M has 3 KV heads; give 1 (MQA) or 3"),
        (["--num-kv-heads", "0"], "error: --num-kv-heads 0: SmolLM2-135M has 3 KV heads; give 1 (MQA) or 3"),
        (["--windows", "0"], "error: --windows 0: score at least 1 window of 512 tokens"),
        (["--calibration-tokens", "0"], "error: --calibration-tokens 0: give a positive count, e.g. 4096"),
        (["--uptrain-seconds", "-1"], "error: --uptrain-seconds -1.0: give seconds >= 0 (0: no uptraining)"),
        (["--uptrain-seconds", "nan"], "error: --uptrain-seconds nan: give seconds >= 0 (0: no uptraining)"),
    ],
)
def test_demo_refuses_bad_arguments_before_any_work(args, message, tmp_path):
    from click.testing import CliRunner

    from convert.cli import main

    result = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "demo"), *args])
    assert result.exit_code == 2 and result.output.strip() == message, result.output
    assert not (tmp_path / "demo").exists()


def test_demo_report_without_uptraining_names_the_calibrated_model():
    """`--uptrain-seconds 0`: three models, no uptraining line, and `from_pretrained` loads the calibrated one."""
    from convert.demo import format_demo

    row = {"kv_heads": 1, "kv_cache_bytes_per_token": 15360, "perplexity": 150.0, "completion": "x y"}
    r = {
        "kv_heads": [3, 1],
        "eval_text": "pydoc_data topics (second half)",
        "eval_windows": 4,
        "window": 512,
        "calibration": {"calibration_tokens": 4096, "calibration_data": "builtin", "device": "cpu"},
        "uptraining": {},
        "prompt": "P",
        "models": {
            "original": {**row, "kv_heads": 3, "kv_cache_bytes_per_token": 46080, "perplexity": 19.7},
            "mean": {**row, "convert_seconds": 0.4},
            "calibrated": {**row, "convert_seconds": 19.0},
        },
        "from_pretrained": 'AutoModelForCausalLM.from_pretrained("out/calibrated")',
        "seconds": 31.0,
    }
    lines = format_demo(r).splitlines()
    assert not any(line.startswith("uptrained") for line in lines)
    assert lines[2].split() == ["original", "3", "46,080", "B", "19.70", "-"]
    assert lines[4].split() == ["calibrated", "1", "15,360", "B", "150.00", "19.0"]
    assert lines[-2] == 'load the calibrated model:  AutoModelForCausalLM.from_pretrained("out/calibrated")'
