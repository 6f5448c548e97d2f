"""Every family in the table, end to end through real files: tiny model -> sharded safetensors -> convert ->
`from_pretrained` -> logits compared with transformers' own forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from convert import convert_checkpoint, convert_model
from convert.families import stock_kv_model_types
from tests.helpers.tiny import logits, make_groups_identical, save, tiny_model

FAMILIES = stock_kv_model_types()  # the classic MHA families have their own tests (test_mha_code.py)
# gpt_bigcode holds H KV heads or one (multi_query): no G in between, so it is grouped to G = 1 only.
ANY_G = [f for f in FAMILIES if f != "gpt_bigcode"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_same_kv_count_changes_nothing(model_type, tmp_path):
    model = tiny_model(model_type)
    src = save(model, tmp_path / "src")
    convert_checkpoint(src, tmp_path / "out", _kv(model), progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_close(logits(out), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize(("model_type", "groups"), [(f, 2) for f in ANY_G] + [("gpt_bigcode", 1)])
def test_identical_heads_in_groups_pool_exactly(model_type, groups, tmp_path):
    model = tiny_model(model_type)
    make_groups_identical(model, groups)
    src = save(model, tmp_path / "src")
    assert len(list(src.glob("model-*.safetensors"))) > 1, "the source should be sharded"
    convert_checkpoint(src, tmp_path / "out", groups, progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert _kv_raw(config, model_type) == groups
    assert_close(logits(out), logits(model), rtol=1e-4, atol=1e-4)
    # And the model is really smaller where it should be: K/V rows shrank by half.
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    generated = out.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "falcon", "olmo2", "gemma3_text"])
def test_distinct_heads_change_logits(model_type, tmp_path):
    """The identical-heads test means something only if pooling distinct heads does change the function."""
    model = tiny_model(model_type)
    out = convert_model(model, 1)
    assert out.config is not model.config
    assert (logits(out) - logits(model)).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "falcon", "cohere"])
def test_convert_model_matches_convert_checkpoint(model_type, tmp_path):
    model = tiny_model(model_type)
    in_memory = convert_model(model, 2, method="mean")
    convert_checkpoint(save(model, tmp_path / "src"), tmp_path / "out", 2, progress=False)
    from_files = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(in_memory) is type(model)
    assert_close(logits(in_memory), logits(from_files), rtol=0, atol=0)


def test_falcon_classic_mha_to_grouped_and_multi_query(tmp_path):
    """Classic falcon interleaves q/k/v per head; G=1 becomes multi_query, 1<G<H the new grouped architecture."""
    model = tiny_model(
        "falcon", new_decoder_architecture=False, multi_query=False, parallel_attn=True, num_kv_heads=None
    )
    make_groups_identical(model, 1)
    src = save(model, tmp_path / "src")
    for groups in (1, 2):
        convert_checkpoint(src, tmp_path / f"g{groups}", groups, progress=False)
        raw = json.loads((tmp_path / f"g{groups}" / "config.json").read_text())
        out = AutoModelForCausalLM.from_pretrained(tmp_path / f"g{groups}").eval()
        assert_close(logits(out), logits(model), rtol=1e-4, atol=1e-4)
        assert raw["multi_query"] if groups == 1 else raw["new_decoder_architecture"]


def test_mean_pool_by_hand_on_four_heads(tmp_path):
    """4 KV heads -> 2: the written k/v rows are exactly the mean of head pairs (0,1) and (2,3)."""
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    src = save(model, tmp_path / "src")
    convert_checkpoint(src, tmp_path / "out", 2, progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name in ("k_proj", "v_proj"):
        before = getattr(model.model.layers[1].self_attn, name)
        after = getattr(out.model.layers[1].self_attn, name)
        w = before.weight.detach()  # [4*16, 64]
        expected = torch.stack([(w[0:16] + w[16:32]) / 2, (w[32:48] + w[48:64]) / 2]).reshape(32, 64)
        assert_close(after.weight.detach(), expected)
        b = before.bias.detach()
        assert_close(after.bias.detach(), torch.cat([(b[0:16] + b[16:32]) / 2, (b[32:48] + b[48:64]) / 2]))
    # Queries are untouched, byte for byte.
    assert torch.equal(out.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)


def _kv(model) -> int:
    from convert.families import family_for, shapes_for

    return shapes_for(family_for(model.config.model_type), model.config).num_kv_heads


def _kv_raw(config: dict, model_type: str) -> int:
    if model_type == "gpt_bigcode":
        return 1 if config["multi_query"] else config["n_head"]
    from convert.families import family_for

    return config[family_for(model_type).kv_key]


@pytest.mark.parametrize(("model_type", "groups"), [(f, g) for f in FAMILIES for g in (1, 2) if f in ANY_G or g == 1])
def test_planned_shapes_are_what_join_produces(model_type, groups):
    """Output shards are planned from sizes alone (before torch loads); the plan must be exactly what the merge
    then writes. The oracle: split meta tensors, keep the first G KV heads, join."""
    from convert.families import family_for, output_shapes, shapes_for

    model = tiny_model(model_type)
    family = family_for(model_type)
    s_in = shapes_for(family, model.config)
    s_out = output_shapes(s_in, groups, model.config.to_dict(), family)
    state = {k: v.to("meta") for k, v in model.state_dict().items()}
    for layer in range(s_in.num_layers):
        keys = family.attention_keys(layer, set(state))
        att = family.split(layer, state.__getitem__, keys, s_in)
        shrunk = att.replace(
            **{
                a: getattr(att, a)[:groups]
                for a in ("k", "v", "k_bias", "v_bias", "k_norm")
                if getattr(att, a) is not None
            }
        )
        want = {k: tuple(t.shape) for k, t in family.join(layer, shrunk, keys, s_out).items()}
        got = family.planned_shapes(layer, {k: tuple(state[k].shape) for k in keys}, s_in, s_out)
        assert got == want


def test_cli_and_planning_do_not_import_torch(tmp_path):
    """The converter checks and plans a checkpoint and starts copying while torch loads on another thread; that
    only overlaps if nothing on the way imports torch first."""
    import subprocess
    import sys

    src = save(tiny_model("llama"), tmp_path / "src")
    code = (
        "import sys, convert.cli\n"
        "from convert.pipeline.source import open_source\n"
        "from convert.pipeline.planning import plan_tensors, assign_shards\n"
        f"src = open_source({str(src)!r})\n"
        "assign_shards(plan_tensors(src, 1, 'keep')[0], 10**9)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("model_type", FAMILIES)
def test_row_facts_match_the_transformers_model(model_type):
    """A row's q/k norm kind and rotary layout, checked against the model transformers builds for that family."""
    import sys

    from convert.families import family_for, shapes_for

    family = family_for(model_type)
    model = tiny_model(model_type)
    s = shapes_for(family, model.config)
    k_norm = model.state_dict().get(f"{family.prefix.format(i=0)}{family.k_norm}.weight")
    expected = {
        "": None,
        "shared": (s.head_dim,),
        "flat": (s.num_kv_heads * s.head_dim,),
        "per_head": (s.num_kv_heads, s.head_dim),
    }[family.qk_norm]
    assert (None if k_norm is None else tuple(k_norm.shape)) == expected
    if not family.rotary:  # learned positions: the modeling code rotates nothing
        assert not hasattr(sys.modules[type(model).__module__], "rotate_half") and s.rotary_dim == 0
        return
    # rotate_half puts minus the partner of dim 0 at position 0: dim r/2 (half) or dim 1 (interleaved).
    rotate_half = sys.modules[type(model).__module__].rotate_half
    partner = int(rotate_half(torch.arange(1.0, 9.0))[0].abs()) - 1
    assert partner == {"half": 4, "interleaved": 1}[family.rotary]


FUSED = {
    "phi3": dict(),
    "falcon": dict(),
    "falcon_classic": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=True, num_kv_heads=None),
}


@pytest.mark.parametrize("case", FUSED)
@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("groups", [1, 2])
def test_fused_pooling_on_numpy_writes_the_bytes_of_the_torch_method(case, method, groups, tmp_path):
    """`Family.pool_fused` on float32 numpy arrays, rounded once to bf16, gives the very bytes the torch method
    writes for every fused weight and bias: the torch-free path can take the fused layouts too."""
    import numpy as np

    from convert.families import family_for, output_shapes
    from convert.io.safetensors import float32_to, read_float32
    from convert.methods.pooling import WEIGHT_ONLY_POOLS
    from convert.pipeline.source import open_source

    model_type = case.split("_")[0]
    src = save(tiny_model(model_type, **FUSED[case]).to(torch.bfloat16), tmp_path / "src")
    convert_checkpoint(src, tmp_path / "out", groups, method=method, progress=False)
    source, out = open_source(src), open_source(tmp_path / "out")
    family = family_for(model_type)
    s_out = output_shapes(source.shapes, groups, source.raw_config, family)
    fused = [k for k in source.tensors if f".{family.fused}." in k]
    biases = model_type == "falcon"  # the tiny falcon has biases, phi3 has none
    assert len(fused) == (2 if biases else 1) * source.shapes.num_layers
    for key in fused:
        x = read_float32(source.tensors[key])
        pooled = family.pool_fused(x.reshape(x.shape[0], -1), source.shapes, s_out, WEIGHT_ONLY_POOLS[method])
        got = float32_to(pooled.reshape(out.tensors[key].shape), "BF16")
        info = out.tensors[key]
        want = np.fromfile(info.file, dtype=np.uint16, count=info.nbytes // 2, offset=info.offset)
        assert np.array_equal(got.reshape(-1), want), key
