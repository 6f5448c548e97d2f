"""Modeling code shipped with the checkpoint (gpt2, opt, bloom, mpt below H KV heads): tiny models from configs,
real safetensors, real `from_pretrained(trust_remote_code=True)`, a fresh process for loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from convert.cli import main
from convert.errors import ConversionError
from convert.pipeline.conversion import convert_checkpoint
from convert.routes.shipped import ship_modeling_code
from tests.helpers.shipped import CONFIGS, SDPA, H, build, ids, load
from tests.helpers.tiny import make_groups_identical


def convert(src: Path, out: Path, groups: int, method: str = "mean", **kw) -> None:
    convert_checkpoint(src, out, groups, method, progress=False, write_modeling_code=True, **kw)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_shipped_code_at_h_heads_is_the_source(kind: str, tmp_path: Path) -> None:
    """G = H: the shipped classes read the source's own weights and give its logits (fp32)."""
    model = build(kind)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw = ship_modeling_code(kind.split("-")[0], tmp_path, raw, H)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shipped = load(tmp_path)
    assert type(shipped).__name__.startswith("GQA")
    x, mask = ids(), torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(shipped(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
        got, want = shipped(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_identical_heads_convert_exactly(kind: str, tmp_path: Path) -> None:
    """Identical heads inside each group: the converted model (G = 2, shipped code) gives the source's logits, and
    its attention, its cache and its config hold G heads."""
    model = build(kind)
    make_groups_identical(model, 2)
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", 2)
    out = load(tmp_path / "out")
    assert out.config.num_key_value_heads == 2
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(out(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
        cache = out(x, use_cache=True).past_key_values
    d = 64 // H
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(2, 2, 12, d)] * 2


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("groups", [1, 4])
def test_generate_with_cache_equals_recomputation(kind: str, groups: int, tmp_path: Path) -> None:
    """Greedy `generate` with a cache of G heads picks the tokens that full recomputation picks, and sdpa (where
    transformers allows it for the family) gives eager's logits, with a padded batch too."""
    build(kind).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", groups)
    model = load(tmp_path / "out")
    prompt = ids(1, 7)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    if kind in SDPA:
        sdpa = load(tmp_path / "out", "sdpa")
        assert sdpa.config._attn_implementation == "sdpa"
        x, mask = ids(2, 10), torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0  # left padding
        with torch.no_grad():
            torch.testing.assert_close(
                sdpa(x, attention_mask=mask).logits[mask.bool()],
                model(x, attention_mask=mask).logits[mask.bool()],
                rtol=1e-4,
                atol=1e-5,
            )
        # decoding one token at a time (sdpa packs the query heads of a group) with a padded batch
        kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(sdpa.generate(x, **kw), model.generate(x, **kw))


@pytest.mark.parametrize("kind", ["gpt2", "opt", "bloom"])
def test_checkpoint_saved_from_the_base_model(kind: str, tmp_path: Path) -> None:
    """The hub's gpt2, opt and bloom name tensors without the `transformer.` / `model.` prefix (saved from the base
    model, head tied to the embedding): they convert, and load into the causal LM with the source's logits."""
    model = build(kind)
    make_groups_identical(model, 2)
    model.base_model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", 2)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "out")(ids()).logits, model(ids()).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_every_weight_method(method: str, tmp_path: Path) -> None:
    build("bloom").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", 2, method)
    w = load(tmp_path / "out").transformer.h[0].self_attention.query_key_value.weight
    assert w.shape == ((H + 2 * 2) * 8, 64)


def test_refused_without_the_flag(tmp_path: Path) -> None:
    """Exit 2, a message naming the flag and why, and no OUTPUT."""
    build("gpt2").save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-g", "2"])
    assert result.exit_code == 2
    assert "--write-modeling-code" in result.output and "trust_remote_code=True" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="--write-modeling-code"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", 2, progress=False)


def test_source_code_is_never_copied(tmp_path: Path) -> None:
    """The source's own auto_map and *.py files stay behind; only the template's files are written."""
    src = tmp_path / "src"
    build("opt").save_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(raw))
    (src / "modeling_evil.py").write_text("raise SystemExit('executed')\n")
    result = CliRunner().invoke(
        main, ["convert", str(src), str(tmp_path / "out"), "-g", "2", "--write-modeling-code", "--dry-run"]
    )
    assert result.exit_code == 0 and "trust_remote_code=True" in result.output
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", 2)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["auto_map"] == {
        "AutoConfig": "configuration_gqa_opt.GQAOPTConfig",
        "AutoModelForCausalLM": "modeling_gqa_opt.GQAOPTForCausalLM",
    }
    assert written["model_type"] == "gqa_opt" and written["num_key_value_heads"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.py")) == [
        "configuration_gqa_opt.py",
        "gqa_attention.py",
        "modeling_gqa_opt.py",
    ]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "trust_remote_code=True" in card
    notes = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())["notes"]
    assert any("GQAOPTForCausalLM" in n and "trust_remote_code=True" in n for n in notes)


def test_inspect_says_the_route(tmp_path: Path) -> None:
    """inspect marks the G values that need shipped code, and reads a shipped output without running its code."""
    build("mpt").save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "src"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert sorted(info["valid_num_kv_heads"]) == ["1", "2", "4", "8"]
    assert sorted(info["shipped_code"]) == ["1", "2", "4"]  # G = H, the current count, needs no shipped code
    assert all("GQAMptForCausalLM" in r and "trust_remote_code=True" in r for r in info["shipped_code"].values())
    text = CliRunner().invoke(main, ["inspect", str(tmp_path / "src")]).output  # the human form says it too
    assert "shipped code: --write-modeling-code" in text and "trust_remote_code=True" in text
    convert(tmp_path / "src", tmp_path / "out", 4)
    info = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), "--json"]).output)
    assert (info["model_type"], info["num_kv_heads"], sorted(info["shipped_code"])) == ("gqa_mpt", 4, ["1", "2", "4"])


def test_in_memory_conversion_points_to_the_folder_route() -> None:
    from convert import convert_model

    with pytest.raises(ConversionError, match="--write-modeling-code"):
        convert_model(build("gpt2"), 2)


def test_route_between_stock_and_shipped_code() -> None:
    """Which classic sources these rows read as they are (the rest is re-expressed as a stock class)."""
    from convert.families.mha import takes_shipped_route

    gpt2, opt = {"model_type": "gpt2", "n_head": 8}, {"model_type": "opt", "num_attention_heads": 8}
    post_ln = {**opt, "do_layer_norm_before": False}
    assert [takes_shipped_route(gpt2, g) for g in (None, 1, 2, 4, 8)] == [False, False, True, True, False]
    assert [takes_shipped_route(opt, g) for g in (1, 2, 8)] == [False, True, False]
    assert [takes_shipped_route(post_ln, g) for g in (1, 2, 8)] == [True, True, False]
    assert all(takes_shipped_route({"model_type": t}, g) for t in ("bloom", "mpt", "gqa_gpt2") for g in (None, 1))
    assert not takes_shipped_route({"model_type": "llama"}, 1)


def test_mpt_variant_refused(tmp_path: Path) -> None:
    model = build("mpt")
    model.save_pretrained(tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    raw["attn_config"]["qk_ln"] = True
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match="qk_ln"):
        convert(tmp_path / "src", tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()


def test_eval_needs_trust_remote_code(tmp_path: Path) -> None:
    """`gqa-convert eval` refuses shipped code unless --trust-remote-code, then scores it."""
    from tests.helpers.eval import word_tokenizer

    build("gpt2").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", 2)
    word_tokenizer(160).save_pretrained(tmp_path / "out")
    args = ["eval", str(tmp_path / "out"), "--contexts", "16", "--new-tokens", "2", "--max-windows", "2"]
    args += ["--window", "16", "--json"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert "--trust-remote-code" in refused.output and "modeling_gqa_gpt2.py" in refused.output
    result = CliRunner().invoke(main, [*args, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)[0]
    assert (row["model_type"], row["num_kv_heads"]) == ("gqa_gpt2", 2)
    assert row["perplexity"] > 1


def test_hub_id_from_the_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub-style gpt2 (base-model names, tied head) from the local hub cache with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as c

    from tests.helpers.hub import fake_hub_cache

    model = build("gpt2")
    make_groups_identical(model, 4)
    model.base_model.save_pretrained(tmp_path / "src")
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-gpt2", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    args = ["convert", "tiny-org/tiny-gpt2", str(tmp_path / "out"), "-g", "4", "-q", "--write-modeling-code"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "out")(ids()).logits, model(ids()).logits, rtol=1e-4, atol=1e-5)


LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM
trust = sys.argv[1] == "1"
for folder in sys.argv[2:]:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust)
    except Exception as e:
        print("refused", type(e).__name__, str(e).replace(chr(10), " "))
        continue
    with torch.no_grad():
        torch.save(model(torch.arange(3, 12)[None]).logits, folder + ".logits.pt")
    print("loaded", type(model).__name__, model.config.num_key_value_heads)
"""


@pytest.mark.slow
def test_loads_in_a_fresh_process(tmp_path: Path) -> None:
    """A fresh interpreter loads every shipped-code output with trust_remote_code=True (same logits as here), and
    refuses each clearly without it."""
    kinds = ["gpt2", "opt-post-ln", "bloom", "mpt"]
    for kind in kinds:
        build(kind).save_pretrained(tmp_path / kind)
        convert(tmp_path / kind, tmp_path / f"{kind}-out", 2)
    folders = [str(tmp_path / f"{kind}-out") for kind in kinds]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = lambda trust: subprocess.run(
        [sys.executable, "-c", LOADER, trust, *folders], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    loaded = [line for line in run("1") if line.startswith(("loaded", "refused"))]
    names = ["GQAGPT2LMHeadModel", "GQAOPTForCausalLM", "GQABloomForCausalLM", "GQAMptForCausalLM"]
    assert loaded == [f"loaded {name} 2" for name in names]
    for folder in folders:
        with torch.no_grad():
            here = load(Path(folder))(torch.arange(3, 12)[None]).logits
        torch.testing.assert_close(torch.load(folder + ".logits.pt"), here)
    refused = [line for line in run("0") if line.startswith(("loaded", "refused"))]
    assert len(refused) == 4 and all(line.startswith("refused") and "trust_remote_code" in line for line in refused)
