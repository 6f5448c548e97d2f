"""vLLM's Transformers backend with ALiBi: serves the shipped `gqa_bloom` and `gqa_mpt` outputs (imports vLLM).

The backend builds the shipped base model and serves each layer's attention call in a vLLM `Attention` with the
G-head KV cache. Here that `Attention` also gets the model's ALiBi slopes, one per query head, read from
transformers' own ALiBi builders so that they are the numbers the model was trained with. vLLM adds
slope * (key position - query position); bloom and mpt add slope * (key position) and slope * (key position -
max length): per query row these differ by a constant, which softmax ignores.
"""

from __future__ import annotations

import functools

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.models.transformers import TransformersForCausalLM


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


class GQAAlibiForCausalLM(TransformersForCausalLM):
    """vLLM's Transformers backend for a shipped ALiBi model: its attention layers carry the slopes."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        processor = getattr(self, "logits_processor", None)
        if processor is not None and processor.scale is None:
            processor.scale = 1.0  # MPT's config says logit_scale None, and transformers' MPT does not scale logits

    def _get_attn_cls(self):
        cls = super()._get_attn_cls()
        config = self.text_config
        slopes = alibi_slopes(config.model_type, config.num_attention_heads)
        per_rank = len(slopes) // get_tensor_model_parallel_world_size()  # this rank's query heads
        start = get_tensor_model_parallel_rank() * per_rank
        return functools.partial(cls, alibi_slopes=slopes[start : start + per_rank])
