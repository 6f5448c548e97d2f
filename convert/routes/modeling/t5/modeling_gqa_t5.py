"""T5 with grouped-query attention in the decoder: the stock T5 classes with only the decoder's self-attention and
cross-attention replaced. Their k and v projections give G = num_key_value_heads heads of d_kv, and both caches
hold G heads; q, o, the encoder, the feed-forward layers and the relative position bias (one column per query
head) are T5's own, tensor names included. Written by gqa-convert beside the weights (T5, T5.1.1, flan-t5, mT5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention

from .configuration_gqa_t5 import GQAT5Config
from .gqa_attention import attend


class GQAT5Attention(T5Attention):
    def __init__(
        self,
        config: GQAT5Config,
        has_relative_attention_bias: bool = False,
        layer_idx: int | None = None,
        is_causal: bool = False,
    ) -> None:
        super().__init__(config, has_relative_attention_bias, layer_idx=layer_idx, is_causal=is_causal)
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.n_heads // self.num_key_value_heads
        kv = self.num_key_value_heads * self.key_value_proj_dim
        self.k = nn.Linear(self.d_model, kv, bias=False)
        self.v = nn.Linear(self.d_model, kv, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, length = hidden_states.shape[:2]
        d = self.key_value_proj_dim
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        # A static cache hands out a tensor that the update below changes in place: keep its value from now.
        past = past.clone() if isinstance(past, torch.Tensor) else past
        query = self.q(hidden_states).view(batch, length, self.n_heads, d).transpose(1, 2)  # [b, H, n, d]

        cross = key_value_states is not None
        layer_cache, reuse = cache, False
        if isinstance(cache, EncoderDecoderCache):
            layer_cache = cache.cross_attention_cache if cross else cache.self_attention_cache
            reuse = cross and bool(cache.is_updated.get(self.layer_idx))
        if reuse:  # the encoder output does not change while decoding: its K/V were cached at the first step
            key = layer_cache.layers[self.layer_idx].keys
            value = layer_cache.layers[self.layer_idx].values
        else:
            source = key_value_states if cross else hidden_states
            key = self.k(source).view(batch, -1, self.num_key_value_heads, d).transpose(1, 2)  # [b, G, m, d]
            value = self.v(source).view(batch, -1, self.num_key_value_heads, d).transpose(1, 2)
            if layer_cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx)
                if cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True

        if position_bias is None:  # only the first layer computes it; the stack hands it to the others
            keys = key.shape[-2]
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(length, keys, device=query.device, past_seen_tokens=past)
            else:
                position_bias = torch.zeros((1, self.n_heads, length, keys), device=query.device, dtype=query.dtype)
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True

        # T5 does not scale the scores: its position bias and initialisation assume unscaled dot products.
        dropout = self.dropout if self.training else 0.0
        out, weights = attend(self, query, key, value, mask, scaling=1.0, dropout=dropout, position_bias=position_bias)
        return self.o(out.reshape(batch, length, -1)), position_bias, weights


class GQAT5ForConditionalGeneration(T5ForConditionalGeneration):
    """T5ForConditionalGeneration whose decoder attention (self and cross) has G KV heads."""

    config_class = GQAT5Config

    def __init__(self, config: GQAT5Config) -> None:
        super().__init__(config)
        decoder_config = self.decoder.config
        for i, block in enumerate(self.decoder.block):
            block.layer[0].SelfAttention = GQAT5Attention(
                decoder_config, has_relative_attention_bias=i == 0, layer_idx=i, is_causal=True
            )
            block.layer[1].EncDecAttention = GQAT5Attention(decoder_config, layer_idx=i, is_causal=False)
        self.post_init()
