"""The command line through click's CliRunner, and every bad input: a clear message, a non-zero exit, no OUTPUT,
SOURCE untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from convert.cli import main
from tests.helpers.tiny import save, tiny_model


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def src(tmp_path) -> Path:
    return save(tiny_model("llama"), tmp_path / "src")  # 8 heads, 4 KV heads, 3 shards


def test_convert_writes_a_loadable_checkpoint(src, tmp_path):
    out = tmp_path / "out"
    result = run("convert", src, out, "--num-kv-heads", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert "4 -> 1 KV heads" in result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 64)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "gqa_convert.json", "model.safetensors"} <= files
    provenance = json.loads((out / "gqa_convert.json").read_text())
    assert provenance["kv_heads_before"] == 4 and provenance["kv_heads_after"] == 1
    assert [r["layer"] for r in provenance["per_layer"]] == [0, 1]
    assert all(0 < r["k_rel_err"] < 2 for r in provenance["per_layer"])
    card = (out / "README.md").read_text()
    assert "base_model: src" in card and "`mean`" in card


def test_only_the_kv_count_changes_in_config(src, tmp_path):
    run("convert", src, tmp_path / "out", "-g", "2", "-q")
    before = json.loads((src / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k for k in before if before[k] != after.get(k)} == {"num_key_value_heads"}
    assert set(before) == set(after)


def test_untouched_tensors_are_byte_identical_and_sharding_is_kept(src, tmp_path):
    out = tmp_path / "out"
    assert run("convert", src, out, "-g", "2", "--max-shard-size", "100KB", "-q").exit_code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    source = _all_tensors(src)
    written = _all_tensors(out)
    assert set(source) == set(written)
    for name, t in source.items():
        if "k_proj" in name or "v_proj" in name:
            assert written[name].shape[0] == t.shape[0] // 2
        else:
            assert torch.equal(written[name], t) and written[name].dtype == t.dtype, name


def test_dtype_option_casts_floating_tensors(src, tmp_path):
    assert run("convert", src, tmp_path / "out", "-g", "4", "--dtype", "bfloat16", "-q").exit_code == 0
    assert {t.dtype for t in _all_tensors(tmp_path / "out").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    src = save(model, tmp_path / "src")
    assert run("convert", src, tmp_path / "out", "-g", "1", "-q").exit_code == 0
    assert "lm_head.weight" not in _all_tensors(tmp_path / "out")
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()


def test_dry_run_prints_plan_and_writes_nothing(src, tmp_path):
    result = run("convert", src, tmp_path / "out", "-g", "1", "--dry-run")
    assert result.exit_code == 0
    assert "would write" in result.output and "KV cache per token" in result.output
    assert "rewrite model.layers.0.self_attn.k_proj.weight" in result.output
    assert not (tmp_path / "out").exists()


def test_json_report(src, tmp_path):
    result = run("convert", src, tmp_path / "out", "-g", "2", "--json")
    report = json.loads(result.output)
    assert report["kv_heads_after"] == 2 and report["bytes_out"] < report["bytes_in"]
    # 2 layers x 2 bytes... float32: 2 (K,V) * 2 layers * G * 8 head_dim * 4 bytes
    assert report["kv_cache_bytes_per_token_before"] == 2 * 2 * 4 * 8 * 4
    assert report["kv_cache_bytes_per_token_after"] == 2 * 2 * 2 * 8 * 4


def test_inspect_lists_valid_groups(src):
    result = run("inspect", src, "--json")
    info = json.loads(result.output)
    assert info["num_heads"] == 8 and info["num_kv_heads"] == 4 and info["head_dim"] == 8
    assert info["valid_num_kv_heads"] == {"1": 128, "2": 256, "4": 512}
    text = run("inspect", src).output
    assert "(current)" in text and "llama" in text


def test_overwrite_replaces_output(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = run("convert", src, out, "-g", "2", "-q")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "old.txt").exists()
    assert run("convert", src, out, "-g", "2", "-q", "--overwrite").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".out.gqa-*")), "no temporary folders are left behind"


def test_random_method_is_seeded_and_scaled(src, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert (
            run("convert", src, tmp_path / name, "-g", "1", "--method", "random", "--seed", seed, "-q").exit_code == 0
        )
    a, b, c = (_all_tensors(tmp_path / n)["model.layers.0.self_attn.k_proj.weight"] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    source = _all_tensors(src)["model.layers.0.self_attn.k_proj.weight"]
    assert 0.7 < float(a.std() / source.std()) < 1.3


def test_first_method_keeps_first_head_of_each_group(src, tmp_path):
    assert run("convert", src, tmp_path / "out", "-g", "2", "--method", "first", "-q").exit_code == 0
    w = _all_tensors(src)["model.layers.1.self_attn.v_proj.weight"].reshape(4, 8, 64)
    got = _all_tensors(tmp_path / "out")["model.layers.1.self_attn.v_proj.weight"].reshape(2, 8, 64)
    assert torch.equal(got, w[[0, 2]])


# --- bad inputs -------------------------------------------------------------------------------------------------


def _corrupt_config(key, value):
    def apply(src: Path) -> None:
        raw = json.loads((src / "config.json").read_text())
        raw[key] = value
        (src / "config.json").write_text(json.dumps(raw))

    return apply


def _truncate_first_shard(src: Path) -> None:
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])


def _drop_a_shard(src: Path) -> None:
    sorted(src.glob("model-*.safetensors"))[-1].unlink()


BAD_INPUTS = {
    "g_not_dividing": ([], "-g", "3", "does not divide the 4 KV heads"),
    "g_larger": ([], "-g", "8", "larger than the current 4 KV heads"),
    "g_zero": ([], "-g", "0", "at least 1"),
    "unsupported_family": ([_corrupt_config("model_type", "bert")], "-g", "2", "unsupported model_type 'bert'"),
    "missing_config": ([lambda s: (s / "config.json").unlink()], "-g", "2", "no config.json"),
    "malformed_config": ([lambda s: (s / "config.json").write_text("{not json")], "-g", "2", "not valid JSON"),
    "missing_shard": ([_drop_a_shard], "-g", "2", "names shard(s) that do not exist"),
    "truncated_shard": ([_truncate_first_shard], "-g", "2", "is truncated"),
    "heads_disagree": ([_corrupt_config("num_key_value_heads", 2)], "-g", "1", "config and the weights disagree"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_cleanly(case, src, tmp_path):
    mutations, *args, message = BAD_INPUTS[case]
    for mutate in mutations:
        mutate(src)
    before = digest(src)
    out = tmp_path / "out"
    result = run("convert", src, out, *args, "-q")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("error: ")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.gqa-*"))
    assert digest(src) == before


def test_unsupported_family_lists_the_supported_ones(src, tmp_path):
    _corrupt_config("model_type", "bert")(src)
    result = run("convert", src, tmp_path / "out", "-g", "2")
    assert "llama" in result.output and "qwen2" in result.output and "falcon" in result.output


def test_output_inside_source_is_refused(src):
    result = run("convert", src, src / "converted", "-g", "2")
    assert result.exit_code == 2 and "inside SOURCE" in result.output
    assert not (src / "converted").exists()


def test_missing_source_is_refused(tmp_path):
    result = run("convert", tmp_path / "nope", tmp_path / "out", "-g", "2")
    assert result.exit_code == 2 and "neither an existing folder nor a hub id" in result.output


def test_not_enough_disk_space(src, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    result = run("convert", src, tmp_path / "out", "-g", "2")
    assert result.exit_code == 2 and "not enough free disk space" in result.output
    assert not (tmp_path / "out").exists()


def test_pickle_weights_need_allow_pickle(tmp_path):
    model = tiny_model("llama")
    src = tmp_path / "src"
    _save_pickle(model, src)
    assert (src / "pytorch_model.bin").exists() and not list(src.glob("*.safetensors"))
    refused = run("convert", src, tmp_path / "out", "-g", "2")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output and not (tmp_path / "out").exists()
    assert run("convert", src, tmp_path / "out", "-g", "2", "--allow-pickle", "-q").exit_code == 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert out.config.num_key_value_heads == 2


def _save_pickle(model, folder: Path) -> None:
    """What older transformers wrote: config.json beside a pickled state dict."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return out


def test_cli_method_names_are_the_registry():
    from convert.cli import convert
    from convert.methods import METHODS

    choices = next(p.type.choices for p in convert.params if p.name == "method")
    assert list(choices) == list(METHODS)
