"""`--method calibrated` on the classic MHA routes: the stock gpt_bigcode route (gpt2 and opt at G = 1, learned
positions added by the model outside its layers) and the shipped-code routes (gpt2/opt at 1 < G < H, opt-350m's
post-LN layout, bloom, mpt), whose layers the runner builds from the package's own template classes. Tiny models
from configs, real safetensors, real `from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from convert.cli import main
from convert.methods.calibrated import merged_configs
from convert.methods.runner import LayerRunner
from convert.pipeline.conversion import convert_checkpoint
from convert.pipeline.source import open_source
from tests.helpers.shipped import build, ids, load
from tests.helpers.tiny import make_groups_identical

H = 8
# route -> (source kind of test_mha_code.build, G, output model_type)
ROUTES = {
    "gpt2-mqa": ("gpt2", 1, "gpt_bigcode"),  # stock class, learned positions
    "opt-mqa": ("opt", 1, "gpt_bigcode"),  # stock class, learned positions without OPT's offset
    "gpt2-g2": ("gpt2", 2, "gqa_gpt2"),
    "opt-g4": ("opt", 4, "gqa_opt"),
    "opt-post-ln-g2": ("opt-post-ln", 2, "gqa_opt"),  # opt-350m: post-LN, project_in/out
    "bloom-g2": ("bloom", 2, "gqa_bloom"),  # ALiBi, embedding LayerNorm, residual added inside the attention
    "mpt-g2": ("mpt", 2, "gqa_mpt"),
}
FEW = dict(calibration_data="random", calibration_tokens=384, calibration_seq_len=48)
MORE = dict(calibration_data="random", calibration_tokens=2048, calibration_seq_len=64)


def convert(src: Path, out: Path, groups: int, method: str = "calibrated", options: dict | None = None):
    opts = (options or FEW) if method == "calibrated" else None
    report = convert_checkpoint(src, out, groups, method, progress=False, write_modeling_code=True, method_options=opts)
    return load(out), report


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(ids(seed=seed)).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("route", ["gpt2-mqa", "opt-mqa", "opt-post-ln-g2", "bloom-g2"])
def test_runner_embeds_as_the_model_does(route, tmp_path):
    """The first layer's input on the calibration text is the model's own: token embedding plus learned positions
    (gpt_bigcode), OPT's project_in, bloom's embedding LayerNorm."""
    kind, groups, _ = ROUTES[route]
    model = build(kind)
    model.save_pretrained(tmp_path)
    src = open_source(tmp_path, groups=groups)
    new_config, classes = merged_configs(src, groups)
    runner = LayerRunner(src, new_config, torch.float32, **classes)
    x = ids()
    (got,) = runner.embed(x)
    with torch.no_grad():
        want = model(x, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("route", list(ROUTES))
def test_identical_heads_merge_exactly(route, tmp_path):
    kind, groups, model_type = ROUTES[route]
    model = build(kind)
    make_groups_identical(model, groups)
    model.save_pretrained(tmp_path / "src")
    out, report = convert(tmp_path / "src", tmp_path / "out", groups)
    assert out.config.model_type == model_type and report.method == "calibrated"
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-4, atol=1e-4)
    prov = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())
    assert prov["calibration"]["calibration_tokens"] == FEW["calibration_tokens"]


@pytest.mark.parametrize("kind", ["gpt2", "bloom"])
def test_same_kv_count_changes_nothing(kind, tmp_path):
    model = build(kind)
    model.save_pretrained(tmp_path / "src")
    out, _ = convert(tmp_path / "src", tmp_path / "out", H)
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("route", list(ROUTES))
def test_calibrated_beats_mean_on_a_random_model(route, tmp_path):
    """No structure to exploit, but the merge is fitted to the data: its logits stay closer than mean pooling's."""
    kind, groups, _ = ROUTES[route]
    model = build(kind)
    model.save_pretrained(tmp_path / "src")
    ours, _ = convert(tmp_path / "src", tmp_path / "cal", groups, options=MORE)
    mean, _ = convert(tmp_path / "src", tmp_path / "mean", groups, "mean")
    ref = logits(model, seed=7)
    err_ours, err_mean = rel_err(logits(ours, seed=7), ref), rel_err(logits(mean, seed=7), ref)
    assert err_ours < 0.8 * err_mean, (err_ours, err_mean)


@pytest.mark.parametrize(("kind", "groups", "flags"), [("gpt2", 1, []), ("bloom", 2, ["--write-modeling-code"])])
def test_cli_calibrated(kind, groups, flags, tmp_path):
    build(kind).save_pretrained(tmp_path / "src")
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-g", str(groups), "--method", "calibrated"]
    run = CliRunner().invoke(main, [*args, *flags, "--calibration-data", "random", "--calibration-tokens", "256"])
    assert run.exit_code == 0, run.output
    prov = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())
    assert prov["calibration"]["calibration_tokens"] == 256
    config = load(tmp_path / "out").config
    assert config.multi_query if kind == "gpt2" else config.num_key_value_heads == groups


def test_shipped_code_still_needs_the_flag(tmp_path):
    """Calibrated changes nothing about consent: without --write-modeling-code the shipped route exits 2."""
    build("mpt").save_pretrained(tmp_path / "src")
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-g", "2", "--method", "calibrated"]
    run = CliRunner().invoke(main, [*args, "--calibration-data", "random"])
    assert run.exit_code == 2 and "--write-modeling-code" in run.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kind", "groups"), [("gpt2", 2), ("opt", 2), ("bloom", 2), ("gpt2", 1)])
def test_checkpoint_saved_from_the_base_model(kind, groups, tmp_path):
    """The hub's gpt2, opt and bloom name tensors without `transformer.` / `model.`: the runner maps its names."""
    model = build(kind)
    make_groups_identical(model, groups)
    model.base_model.save_pretrained(tmp_path / "src")
    out, _ = convert(tmp_path / "src", tmp_path / "out", groups)
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-4, atol=1e-4)


def test_t5_reconstructed_is_refused_with_the_reason(tmp_path):
    """Where a method does not fit (block reconstruction on T5; calibrated has its T5 route), exit 2 names why and
    what to use."""
    from tests.helpers.t5 import save, tiny_t5

    src = save(tiny_t5("t5"), tmp_path / "src")
    args = ["convert", str(src), str(tmp_path / "out"), "-g", "2", "--write-modeling-code", "--method", "reconstructed"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 2
    assert "block reconstruction" in run.output and "Use --method mean, first, random, calibrated" in run.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["gpt2", "bloom"])
def test_shipped_output_regrouped(kind, tmp_path):
    """A gqa_<x> output (G = 4) regrouped to G = 2: the original runs in the template class at its own KV count."""
    model = build(kind)
    make_groups_identical(model, 2)
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "g4", 4, "mean")
    out, report = convert(tmp_path / "g4", tmp_path / "g2", 2)
    assert report.kv_heads_before == 4 and out.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(out), logits(model), rtol=1e-4, atol=1e-4)
