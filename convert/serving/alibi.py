"""The ALiBi slope of each query head of bloom and mpt, as transformers computes their bias (no vLLM here).

The vLLM plugin hands these to vLLM's attention, which adds slope * (key position - query position). bloom adds
slope * key position and mpt slope * (key position - max length): per query row these differ from vLLM's by a
constant, which softmax ignores.
"""

from __future__ import annotations

import torch


def alibi_slopes(model_type: str, num_heads: int) -> list[float]:
    """The ALiBi slope of each query head, as transformers' bloom or mpt model computes its bias."""
    if model_type == "gqa_bloom":
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        bias = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)  # [H, 1, 2]: slope * (0, 1)
        return bias[:, 0, 1].tolist()
    if model_type == "gqa_mpt":
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

        # transformers' MptModel builds its bias with the default alibi_bias_max (8): the same here
        bias = build_mpt_alibi_tensor(num_heads, 2)  # [H, 1, 2]: slope * (-1, 0)
        return (-bias.reshape(num_heads, 2)[:, 0]).tolist()
    raise ValueError(f"no ALiBi slopes for model_type {model_type!r}: this class serves gqa_bloom and gqa_mpt")
