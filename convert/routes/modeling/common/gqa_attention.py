"""Attention with G key/value heads for H query heads, shipped with checkpoints converted by gqa-convert.

K and V stay with G heads everywhere (projection, cache); they are repeated to H heads only inside the attention
call. Query head i reads KV head i // (H / G): contiguous groups, as in transformers' `repeat_kv`. A per-query-head
additive bias (ALiBi) is passed as `position_bias` [batch, H, q, k] and stays per query head.

This file imports only torch and transformers: it runs wherever the checkpoint is loaded.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    """[batch, G, seq, d] -> [batch, G * times, seq, d], each KV head repeated for its group of query heads."""
    if times == 1:
        return x
    b, g, s, d = x.shape
    return x[:, :, None].expand(b, g, times, s, d).reshape(b, g * times, s, d)


def eager_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, H, q, d]
    key: torch.Tensor,  # [batch, G, k, d]
    value: torch.Tensor,  # [batch, G, k, d]
    attention_mask: torch.Tensor | None,  # additive float, or bool (True = attend), [batch, 1 or H, q, >= k]
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,  # [batch or 1, H, q or 1, k]
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [batch, H, q, k]
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    # softmax in float32, as the stock classes do, then back to the activations' dtype
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [batch, q, H, d]
    return out, weights


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the attention implementation the config names (eager here; sdpa, flash, ... from transformers).

    `module.num_key_value_groups` (H / G) tells every implementation how many query heads share a KV head.
    Returns [batch, q, H, d] and the weights where the implementation gives them.
    """
    impl = module.config._attn_implementation or "eager"
    if position_bias is not None:
        kwargs["position_bias"] = position_bias
        if impl not in ("eager", "sdpa"):
            raise ValueError(
                f"attn_implementation={impl!r} cannot add this model's ALiBi bias per query head: "
                "load it with attn_implementation='sdpa' or 'eager'"
            )
    if impl == "eager":
        function = eager_gqa_attention
    else:
        function = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_gqa_attention)
    return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
