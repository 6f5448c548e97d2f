"""Sizes planned from config.json alone, for configs as every transformers version wrote them.

The oracle is transformers itself: `AutoConfig.from_pretrained` on the same file. What config.json omits comes from
each family's row (`Family.defaults`); these tests derive the cases from the table, so a row whose defaults drift
from its config class fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from convert.errors import ConversionError
from convert.families import FAMILIES, config_dtype, config_view, family_for, shapes_for, stock_kv_model_types
from tests.helpers.hub import HUB_CONFIGS, hub_config, save_hub_style
from tests.helpers.tiny import logits

# The rows whose transformers class holds a KV-head count; the classic MHA rows read their configs with their
# stock config class and have their own tests (test_mha_code.py, test_t5.py).
STOCK = stock_kv_model_types()
STOCK_ROWS = [f for f in FAMILIES if f.model_types[0] in STOCK]
SIZES = [(8, 64), (4, 96), (16, 128)]  # (heads, hidden): head_dim 8, 24, 8


def _variants(model_type: str, heads: int, hidden: int) -> dict[str, dict]:
    """config.json as different transformers versions write it; only sizes every config states are given."""
    kv = family_for(model_type).kv_key
    base = {"model_type": model_type, "num_attention_heads": heads, "hidden_size": hidden, "num_hidden_layers": 2}
    variants = {
        "sizes_only": base,
        "nulls": {**base, kv: None, "head_dim": None},
        "v4_legacy": {
            **base,
            "rope_theta": 500000.0,
            "rope_scaling": None,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.36.2",
        },
        "v4_partial_rotary": {**base, "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
        "v4_rope_scaling": {**base, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0},
        "v5_rope_parameters": {
            **base,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "dtype": "float16",
        },
        "explicit": {**base, kv: heads // 2, "head_dim": 16},
    }
    if model_type == "falcon":
        variants["falcon_classic"] = {**base, "multi_query": False, "new_decoder_architecture": False}
        variants["falcon_new"] = {**base, "new_decoder_architecture": True, "num_kv_heads": heads // 4}
        variants["falcon_alibi"] = {**base, "alibi": True, "multi_query": False}
        variants["falcon_n_embed"] = {k if k != "hidden_size" else "n_embed": v for k, v in base.items()}
    return variants


def _transformers_shapes(model_type: str, raw: dict, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    try:
        config = AutoConfig.from_pretrained(tmp_path)
    except Exception:  # transformers refuses this spelling for this family: nothing to compare with
        return None
    return shapes_for(family_for(model_type), config)


@pytest.mark.parametrize("model_type", STOCK)
def test_sizes_from_config_json_match_transformers(model_type, tmp_path):
    """Every family, every spelling, three sizes: the plan read from config.json equals what transformers reads,
    including the defaults for omitted keys (head_dim, KV heads, rotary factor) declared in the family's row."""
    family = family_for(model_type)
    compared = 0
    for heads, hidden in SIZES:
        for name, raw in _variants(model_type, heads, hidden).items():
            expected = _transformers_shapes(model_type, raw, tmp_path)
            if expected is None:
                continue
            if expected.num_kv_heads > heads or heads % expected.num_kv_heads:  # transformers does not check this
                with pytest.raises(ConversionError, match="must divide"):
                    config_view(raw, family, tmp_path / "config.json")
                compared += 1
                continue
            got = shapes_for(family, config_view(raw, family, tmp_path / "config.json"))
            assert got == expected, f"{model_type} {name} ({heads} heads, hidden {hidden})"
            compared += 1
    assert compared >= 3 * 5, "transformers should accept most spellings"


@pytest.mark.parametrize("model_type", STOCK)
def test_configs_saved_by_this_transformers_plan_the_same(model_type, tmp_path):
    from convert.pipeline.source import read_config
    from tests.helpers.tiny import tiny_config

    tiny_config(model_type).save_pretrained(tmp_path)
    family = family_for(model_type)
    expected = shapes_for(family, AutoConfig.from_pretrained(tmp_path))
    assert shapes_for(family, config_view(read_config(tmp_path), family, tmp_path / "config.json")) == expected


@pytest.mark.parametrize("row", STOCK_ROWS, ids=lambda f: f.model_types[0])
def test_each_default_in_a_row_is_the_config_class_default(row):
    """A default in a row is there because transformers assumes it: it must be the config class's own value."""
    from transformers import CONFIG_MAPPING

    for model_type in row.model_types:
        config = CONFIG_MAPPING[model_type]()
        rope = getattr(config, "rope_parameters", None) or {}  # gpt_bigcode has no rope
        if rope and all(isinstance(v, dict) for v in rope.values()):
            rope = rope["full_attention"]
        for key, value in row.defaults.items():
            actual = rope.get(key) if key == "partial_rotary_factor" else getattr(config, key)
            assert actual == value, f"{model_type}.{key}: row says {value}, {type(config).__name__} {actual}"


def test_config_dtype_reads_both_spellings():
    assert config_dtype({"torch_dtype": "float16"}) == "float16"
    assert config_dtype({"dtype": "bfloat16", "torch_dtype": "float16"}) == "bfloat16"
    assert config_dtype({}) is None


# (KV heads in the published config, G to convert to); `None`: planned only (see test below).
HUB_CASES = {
    "Llama-2-7b": (8, 2),
    "llama-7b-v1": (8, 4),
    "Qwen1.5-0.5B": (8, 1),
    "Mistral-7B-v0.1": (4, 2),
    "gemma-7b": (8, 2),
    "phi-2": (8, 4),
    "falcon-7b": (1, None),
    "falcon-40b": (4, None),
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_configs_plan_as_transformers_reads_them(name, tmp_path):
    raw = hub_config(name)
    family = family_for(raw["model_type"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    expected = shapes_for(family, AutoConfig.from_pretrained(tmp_path))
    assert shapes_for(family, config_view(raw, family, tmp_path / "config.json")) == expected
    assert expected.num_kv_heads == HUB_CASES[name][0]


CONVERT_AND_LIST_IMPORTS = """
import sys
from convert.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("IMPORTED", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"}))
"""


@pytest.mark.parametrize("name", [n for n, (_, g) in HUB_CASES.items() if g])
def test_weight_only_conversion_of_hub_configs_never_imports_torch(name, tmp_path):
    """The published config as it is (legacy keys, no head_dim, null KV heads, bf16/fp16 weights): mean pooling
    runs on numpy alone, and the result loads in transformers and computes what the source did."""
    _, groups = HUB_CASES[name]
    model = save_hub_style(name, tmp_path / "src", groups)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", CONVERT_AND_LIST_IMPORTS, "convert", str(tmp_path / "src"), str(out), "-g"]
    result = subprocess.run([*cmd, str(groups), "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout, result.stdout
    kv_key = family_for(model.config.model_type).kv_key
    assert json.loads((out / "config.json").read_text())[kv_key] == groups
    # Both in float32: half-precision kernels round MHA and GQA attention differently.
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert converted.config.num_key_value_heads == groups
    assert_close(logits(converted), logits(source), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["falcon-7b", "falcon-40b"])
def test_fused_hub_configs_are_planned_without_torch(name, tmp_path):
    """Fused q/k/v layouts are merged with torch, but checking and planning them never needs it or transformers."""
    save_hub_style(name, tmp_path / "src")
    cmd = [sys.executable, "-c", CONVERT_AND_LIST_IMPORTS, "inspect", str(tmp_path / "src")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout, result.stdout
