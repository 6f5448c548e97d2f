"""What the vLLM plugin gives vLLM's attention for the ALiBi outputs, checked without vLLM: the slopes reproduce
transformers' own bloom and mpt biases at every position (power-of-2 head counts and not), and the plugin is
declared where vLLM looks for it (the `vllm.general_plugins` entry point) for the architectures the templates
write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from convert.routes.shipped import TEMPLATES
from convert.serving.alibi import alibi_slopes
from convert.serving.vllm_plugin import ARCHITECTURES

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16])
def test_slopes_reproduce_transformers_bias(heads: int) -> None:
    length = 37
    slopes = torch.tensor(alibi_slopes("gqa_bloom", heads))
    bloom = build_alibi_tensor(torch.ones(1, length), heads, torch.float32)[:, 0]  # [H, T]: slope * position
    torch.testing.assert_close(bloom, slopes[:, None] * torch.arange(length), rtol=0, atol=0)
    slopes = torch.tensor(alibi_slopes("gqa_mpt", heads))
    mpt = build_mpt_alibi_tensor(heads, length).reshape(heads, length)  # slope * (position - (T - 1))
    torch.testing.assert_close(mpt, slopes[:, None] * torch.arange(1 - length, 1), rtol=0, atol=0)
    assert len(set(slopes.tolist())) == heads  # one slope per query head, none shared


def test_slopes_for_another_model_type_are_refused() -> None:
    with pytest.raises(ValueError, match="gqa_bloom and gqa_mpt"):
        alibi_slopes("gqa_gpt2", 4)


def test_plugin_is_declared_for_the_alibi_templates() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"gqa_convert": "convert.serving.vllm_plugin:register"}
    assert "serve" in project["optional-dependencies"]
    written = {t: json.loads((TEMPLATES / t / "template.json").read_text()) for t in ("bloom", "mpt", "gpt2", "opt")}
    assert set(ARCHITECTURES) == {a for t in ("bloom", "mpt") for a in written[t]["architectures"]}
    for manifest in written.values():  # what vLLM's Transformers backend builds
        assert list(manifest["auto_map"])[:2] == ["AutoConfig", "AutoModel"]
