"""T5 as a source: tiny T5 (relu, tied head), T5.1.1 (gated-gelu, untied head) and mT5 built from configs, saved
as real safetensors, converted by the real pipeline and loaded by real `from_pretrained` with the shipped code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM

from convert.cli import main
from convert.families.t5 import T5_FAMILIES, t5_shapes
from convert.pipeline.conversion import convert_checkpoint
from convert.routes.shipped import ship_modeling_code
from tests.helpers.t5 import D_KV, DEC_LAYERS, KINDS, H, save, tiny_t5


def make_groups_identical(model: torch.nn.Module, groups: int) -> None:
    """Every decoder K/V head (self and cross) becomes the first head of its contiguous group."""
    with torch.no_grad():
        for block in model.decoder.block:
            for att in (block.layer[0].SelfAttention, block.layer[1].EncDecAttention):
                for proj in (att.k, att.v):
                    w = proj.weight.view(groups, H // groups, D_KV, -1)
                    w.copy_(w[:, :1].expand_as(w).clone())


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # a padded row: the cross-attention mask must reach the grouped heads
    return {
        "input_ids": torch.randint(2, 96, (2, 11), generator=gen),
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(2, 96, (2, 7), generator=gen),
    }


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()


def convert(src: Path, out: Path, groups: int, method: str = "mean") -> Path:
    convert_checkpoint(src, out, groups, method, progress=False, write_modeling_code=True)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_g_equal_to_heads_leaves_logits_unchanged(kind, tmp_path):
    """At G = H the stock class holds the output: no code is shipped and it loads without trust_remote_code."""
    model = tiny_t5(kind)
    out = convert(save(model, tmp_path / "src"), tmp_path / "out", H)
    assert not list(out.glob("*.py"))
    converted = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(converted) is type(model)
    torch.testing.assert_close(logits(converted, inputs()), logits(model, inputs()), rtol=0, atol=0)
    card = (out / "README.md").read_text()  # the card names the class that loads it
    assert "AutoModelForSeq2SeqLM.from_pretrained" in card and "AutoModelForCausalLM" not in card


@pytest.mark.parametrize("kind", list(KINDS))
def test_shipped_classes_on_the_source_weights_give_its_logits(kind, tmp_path):
    """The shipped code at G = H (every decoder attention replaced, nothing pooled) computes what T5 computes."""
    model = tiny_t5(kind)
    folder = save(model, tmp_path / "src")
    raw = json.loads((folder / "config.json").read_text())
    raw = ship_modeling_code("t5", folder, T5_FAMILIES[0].patch_config(raw, H), H)
    (folder / "config.json").write_text(json.dumps(raw))
    shipped = load(folder)
    assert type(shipped).__name__ == "GQAT5ForConditionalGeneration"
    torch.testing.assert_close(logits(shipped, inputs()), logits(model, inputs()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("groups,method", [(2, "mean"), (1, "mean"), (2, "first")])
def test_identical_heads_in_each_group_give_the_source_logits(kind, groups, method, tmp_path):
    model = tiny_t5(kind)
    make_groups_identical(model, groups)
    out = convert(save(model, tmp_path / "src"), tmp_path / "out", groups, method)
    converted = load(out)
    assert type(converted).__name__ == "GQAT5ForConditionalGeneration"
    assert converted.config.num_key_value_heads == groups
    torch.testing.assert_close(logits(converted, inputs()), logits(model, inputs()))


def test_pooling_changes_the_logits_when_heads_differ(tmp_path):
    """The identical-heads test above could pass with a model that ignores K/V: here pooling must show."""
    model = tiny_t5("t5.1.1")
    converted = load(convert(save(model, tmp_path / "src"), tmp_path / "out", 1))
    assert (logits(converted, inputs()) - logits(model, inputs())).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["t5", "t5.1.1"])
def test_everything_but_decoder_kv_is_byte_identical(kind, tmp_path):
    src = save(tiny_t5(kind), tmp_path / "src")
    out = convert(src, tmp_path / "out", 2)
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        names = sorted(a.keys())
        assert names == sorted(b.keys())
        # Compared as bytes, not values (as values -0.0 equals 0.0 and NaN differs from itself).
        changed = {
            n
            for n in names
            if bytes(a.get_tensor(n).view(torch.uint8).flatten().numpy())
            != bytes(b.get_tensor(n).view(torch.uint8).flatten().numpy())
        }
    kv = (
        "layer.0.SelfAttention.k",
        "layer.0.SelfAttention.v",
        "layer.1.EncDecAttention.k",
        "layer.1.EncDecAttention.v",
    )
    assert changed == {f"decoder.block.{b}.{n}.weight" for b in range(DEC_LAYERS) for n in kv}
    # what passes through includes the encoder, the relative position bias, q/o, the embeddings and the head
    assert "encoder.block.0.layer.0.SelfAttention.k.weight" in names
    assert "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in names
    if kind == "t5.1.1":
        converted = load(out)
        assert not torch.equal(converted.lm_head.weight, converted.shared.weight)  # the untied head stays untied


def test_both_caches_hold_g_heads_and_generate_matches_recomputation(tmp_path):
    model = tiny_t5("t5.1.1")
    converted = load(convert(save(model, tmp_path / "src"), tmp_path / "out", 2))
    batch = inputs()
    with torch.no_grad():
        cache = converted(**batch, use_cache=True).past_key_values
    for layer in range(DEC_LAYERS):
        self_layer = cache.self_attention_cache.layers[layer]
        cross_layer = cache.cross_attention_cache.layers[layer]
        assert self_layer.keys.shape == self_layer.values.shape == (2, 2, 7, D_KV)  # [batch, G, decoded, d_kv]
        assert cross_layer.keys.shape == cross_layer.values.shape == (2, 2, 11, D_KV)  # [batch, G, input, d_kv]

    enc = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    settings = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = converted.generate(**enc, use_cache=True, **settings)
    recomputed = converted.generate(**enc, use_cache=False, **settings)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert len(set(cached.sequences[0].tolist())) > 2  # a sequence that is not one repeated token
    # One full forward over the generated sequence gives every step's logits at once.
    full = logits(converted, {**enc, "decoder_input_ids": cached.sequences[:, :-1]})
    torch.testing.assert_close(torch.stack(cached.logits, dim=1), full, rtol=1e-5, atol=1e-5)
    # Beam search reorders both caches between steps.
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(converted.generate(**enc, **beams), converted.generate(**enc, use_cache=False, **beams))


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_methods_pool_every_decoder_attention(method, tmp_path):
    model = tiny_t5("t5")
    converted = load(convert(save(model, tmp_path / "src"), tmp_path / "out", 1, method))
    for block in converted.decoder.block:
        for att in (block.layer[0].SelfAttention, block.layer[1].EncDecAttention):
            assert att.k.weight.shape == att.v.weight.shape == (D_KV, 24)
    source = model.decoder.block[1].layer[1].EncDecAttention.v.weight.view(H, D_KV, -1)
    got = converted.decoder.block[1].layer[1].EncDecAttention.v.weight
    if method == "mean":
        torch.testing.assert_close(got, source.mean(0))
    elif method == "first":
        assert torch.equal(got, source[0])
    else:  # fresh heads with the group's mean and spread
        assert not torch.allclose(got, source.mean(0), atol=1e-3)
        torch.testing.assert_close(got.std(), source.std(), rtol=0.2, atol=0)
    encoder_k = converted.encoder.block[0].layer[0].SelfAttention.k.weight
    assert torch.equal(encoder_k, model.encoder.block[0].layer[0].SelfAttention.k.weight)


def test_shapes_read_d_kv_and_count_both_attention_modules():
    s = t5_shapes(tiny_t5("t5").config)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.hidden, s.num_layers) == (H, H, D_KV, 24, 2 * DEC_LAYERS)


# config.json as published for google/flan-t5-small (sizes only): 6 heads of d_kv 64 in d_model 512 (512 / 6 is not
# even an integer), 8 decoder blocks; and for t5-small, written before num_decoder_layers existed.
FLAN_T5_SMALL = dict(
    architectures=["T5ForConditionalGeneration"],
    d_ff=1024,
    d_kv=64,
    d_model=512,
    decoder_start_token_id=0,
    dense_act_fn="gelu_new",
    eos_token_id=1,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=True,
    is_gated_act=True,
    model_type="t5",
    n_positions=512,
    num_decoder_layers=8,
    num_heads=6,
    num_layers=8,
    pad_token_id=0,
    relative_attention_max_distance=128,
    relative_attention_num_buckets=32,
    tie_word_embeddings=False,
    torch_dtype="float32",
    vocab_size=32128,
)
T5_SMALL = dict(
    architectures=["T5WithLMHeadModel"],
    d_ff=2048,
    d_kv=64,
    d_model=512,
    model_type="t5",
    n_positions=512,
    num_heads=8,
    num_layers=6,
    output_past=True,
    vocab_size=32128,
)


@pytest.mark.parametrize(
    "raw,expected",
    [(FLAN_T5_SMALL, (6, 64, 512, 16, 24_576, 4_096)), (T5_SMALL, (8, 64, 512, 12, 24_576, 3_072))],
    ids=["flan-t5-small", "t5-small"],
)
def test_published_configs_give_their_sizes_and_cache_bytes(raw, expected):
    from convert.families import family_for, shapes_for
    from convert.families.t5 import cache_bytes

    family = family_for(raw["model_type"])
    s = shapes_for(family, family.config_view(raw))
    per_token = cache_bytes(s, s.num_kv_heads, 4)["self_attention_per_output_token"]
    mqa = cache_bytes(s, 1, 4)["cross_attention_per_input_token"]
    assert (s.num_heads, s.head_dim, s.hidden, s.num_layers, per_token, mqa) == expected


def test_inspect_and_dry_run_give_both_caches(tmp_path):
    src = save(tiny_t5("t5"), tmp_path / "src")
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(src)], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "head_dim 8" in shown.output and "cross-attention" in shown.output
    # 2 decoder layers * (K + V) * G heads * 8 dims * 4 bytes, for each cache
    dry = runner.invoke(
        main, ["convert", str(src), str(tmp_path / "out"), "-g", "1", "--dry-run", "--write-modeling-code"]
    )
    assert dry.exit_code == 0, dry.output
    assert "Self-attention: 512 -> 128 B per generated token" in dry.output
    assert "cross-attention: 512 -> 128 B per input token" in dry.output
    assert not (tmp_path / "out").exists()


def test_g_that_does_not_divide_the_heads_is_refused(tmp_path):
    src = save(tiny_t5("t5"), tmp_path / "src")
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "-g", "3"])
    assert result.exit_code == 2
    assert "does not divide the 4 KV heads" in result.output and "Choose one of [1, 2, 4]" in result.output
    assert not (tmp_path / "out").exists()


def test_calibrated_converts_and_reconstructed_is_refused_before_anything_is_written(tmp_path):
    """calibrated has a T5 route (tests/methods/test_calibrated_t5.py); block reconstruction does not."""
    src = save(tiny_t5("t5"), tmp_path / "src")
    args = ["convert", str(src), str(tmp_path / "out"), "-g", "2", "--write-modeling-code", "--method", "calibrated"]
    result = CliRunner().invoke(main, [*args, "--calibration-data", "random", "--option", "calibration_seq_len=32"])
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "out").config.num_key_value_heads == 2
    args = ["convert", str(src), str(tmp_path / "rec"), "-g", "2", "--write-modeling-code", "--method", "reconstructed"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--method reconstructed is not available" in result.output
    assert "mean, first, random, calibrated" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_shipped_code_is_written_only_when_asked(tmp_path):
    src = save(tiny_t5("t5"), tmp_path / "src")
    refused = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "-g", "2"])
    assert refused.exit_code == 2
    assert "--write-modeling-code" in refused.output and "AutoModelForSeq2SeqLM" in refused.output
    assert not (tmp_path / "out").exists()
    args = ["convert", str(src), str(tmp_path / "out"), "-g", "2", "--write-modeling-code", "--quiet"]
    written = CliRunner().invoke(main, args)
    assert written.exit_code == 0, written.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gqa_t5" and config["num_key_value_heads"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.py")) == [
        "configuration_gqa_t5.py",
        "gqa_attention.py",
        "modeling_gqa_t5.py",
    ]


def test_an_encoder_only_checkpoint_is_refused(tmp_path):
    from transformers import T5EncoderModel

    src = tmp_path / "src"
    T5EncoderModel(tiny_t5("t5").config).save_pretrained(src)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "-g", "2", "--write-modeling-code"])
    assert result.exit_code == 2
    assert "encoder-only (T5EncoderModel)" in result.output and "Convert the full encoder-decoder" in result.output
    assert not (tmp_path / "out").exists()


def test_sharded_bfloat16_source_pools_in_float32_and_casts_once(tmp_path):
    model = tiny_t5("t5.1.1").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 1
    out = convert(tmp_path / "src", tmp_path / "out", 2)
    converted = load(out)
    assert converted.dtype == torch.bfloat16
    for b in range(DEC_LAYERS):
        for name in ("layer.0.SelfAttention.k", "layer.1.EncDecAttention.v"):
            source = model.get_submodule(f"decoder.block.{b}.{name}").weight  # [H * d, D]
            expected = source.float().view(2, H // 2, D_KV, -1).mean(1).reshape(2 * D_KV, -1).to(torch.bfloat16)
            assert torch.equal(converted.get_submodule(f"decoder.block.{b}.{name}").weight, expected)


@pytest.mark.slow
def test_output_loads_in_a_fresh_process_only_with_trust_remote_code(tmp_path):
    out = convert(save(tiny_t5("t5.1.1"), tmp_path / "src"), tmp_path / "out", 2)
    code = (
        "import sys; from transformers import AutoModelForSeq2SeqLM as A; "
        "m = A.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == '1'); "
        "print(type(m).__name__, m.decoder.block[1].layer[1].EncDecAttention.k.weight.shape[0])"
    )
    env_cwd = dict(cwd=tmp_path, capture_output=True, text=True, timeout=300)  # away from the project: no import path
    trusted = subprocess.run([sys.executable, "-c", code, str(out), "1"], **env_cwd)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert trusted.stdout.split()[-2:] == ["GQAT5ForConditionalGeneration", str(2 * D_KV)]
    refused = subprocess.run([sys.executable, "-c", code, str(out), "0"], **env_cwd)
    assert refused.returncode != 0
    assert "trust_remote_code" in refused.stderr


def test_eager_and_sdpa_agree_with_the_source_on_padded_inputs(tmp_path):
    model = tiny_t5("t5.1.1")
    make_groups_identical(model, 2)
    out = convert(save(model, tmp_path / "src"), tmp_path / "out", 2)
    expected = logits(model, inputs())
    for implementation in ("eager", "sdpa"):
        converted = AutoModelForSeq2SeqLM.from_pretrained(
            out, trust_remote_code=True, attn_implementation=implementation
        ).eval()
        assert converted.config._attn_implementation == implementation
        torch.testing.assert_close(logits(converted, inputs()), expected)
