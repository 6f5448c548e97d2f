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


@pytest.mark.slow
def test_demo_command_runs_offline(smollm2_path, tmp_path):
    """The README's first command: real weights, converted by mean pooling and by calibration, reloaded, scored and
    made to write, side by side; the JSON names the folder `from_pretrained` loads."""
    from click.testing import CliRunner

    from convert.cli import main

    args = ["demo", "--output", str(tmp_path / "demo"), "--windows", "1", "--calibration-tokens", "1024", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.output[result.output.index("{") :])
    models = r["models"]
    assert list(models) == ["original", "mean", "calibrated"] and r["kv_heads"] == [3, 1]
    assert [m["kv_heads"] for m in models.values()] == [3, 1, 1]
    before, after = models["original"]["kv_cache_bytes_per_token"], models["mean"]["kv_cache_bytes_per_token"]
    assert before == 3 * after == 3 * models["calibrated"]["kv_cache_bytes_per_token"] == 3 * 2 * 30 * 64 * 4
    assert r["calibration"]["calibration_tokens"] == 1024
    # The story the demo tells: mean pooling loses most of the model, calibration takes much of it back.
    ppl = {name: m["perplexity"] for name, m in models.items()}
    assert ppl["original"] < ppl["calibrated"] < ppl["mean"] / 3, ppl
    # One sentence each: the original's is real text; the converted ones show what the merge kept (may be garbage).
    assert len(models["original"]["completion"].split()) > 3
    assert all(isinstance(m["completion"], str) for m in models.values())
    folder = tmp_path / "demo" / "calibrated"
    assert r["from_pretrained"] == f'AutoModelForCausalLM.from_pretrained("{folder}")'
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_key_value_heads == 1
