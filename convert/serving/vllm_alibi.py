"""vLLM's Transformers backend with ALiBi: serves the shipped `gqa_bloom` and `gqa_mpt` outputs (imports vLLM).

The backend builds the shipped base model and serves each layer's attention call in a vLLM `Attention` with the
G-head KV cache. Here that `Attention` also gets the model's ALiBi slopes, one per query head, read from
transformers' own ALiBi builders so that they are the numbers the model was trained with. vLLM adds
slope * (key position - query position); bloom and mpt add slope * (key position) and slope * (key position -
max length): per query row these differ by a constant, which softmax ignores.
"""

from __future__ import annotations

import functools

from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.models.transformers import TransformersForCausalLM

from convert.serving.alibi import alibi_slopes


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
