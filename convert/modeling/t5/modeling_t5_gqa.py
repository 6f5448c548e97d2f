"""T5 with grouped-query attention in the decoder: self-attention and cross-attention keep `num_key_value_heads`
(G) K/V heads; the encoder, the feed-forward layers and the relative position bias are the stock T5 ones.

Shipped beside converted weights by gqa-convert and loaded with
`AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)`. Imports only torch and transformers.

Groups are contiguous: query head i reads K/V head i // (H/G), as transformers' `repeat_kv` does. The caches hold
the G heads; they are repeated to H heads only for the score computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mt5 import modeling_mt5
from transformers.models.t5 import modeling_t5


def kv_heads(config: Any) -> int:
    """G from the config; a config without the key is plain multi-head T5 (G = H)."""
    return int(getattr(config, "num_key_value_heads", None) or config.num_heads)


class GroupedKV:
    """Mixed in before T5Attention (or mT5's copy of it): k and v projections give G heads of d_kv; q, o and the
    position bias keep H heads."""

    def __init__(
        self,
        config: Any,
        has_relative_attention_bias: bool = False,
        layer_idx: int | None = None,
        is_causal: bool = False,
    ) -> None:
        super().__init__(config, has_relative_attention_bias, layer_idx=layer_idx, is_causal=is_causal)
        self.n_kv_heads = kv_heads(config)
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_key_value_heads={self.n_kv_heads} must divide num_heads={self.n_heads}: fix config.json"
            )
        self.k = nn.Linear(self.d_model, self.n_kv_heads * self.key_value_proj_dim, bias=False)
        self.v = nn.Linear(self.d_model, self.n_kv_heads * self.key_value_proj_dim, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        d = self.key_value_proj_dim
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        # A static cache hands out a tensor that the update below changes in place: keep its value from now.
        past = past.clone() if isinstance(past, torch.Tensor) else past
        query = self.q(hidden_states).view(batch, length, self.n_heads, d).transpose(1, 2)  # [b, H, n, d]

        cross = key_value_states is not None
        reuse = False
        layer_cache = cache
        if isinstance(cache, EncoderDecoderCache):
            layer_cache = cache.cross_attention_cache if cross else cache.self_attention_cache
            reuse = cross and bool(cache.is_updated.get(self.layer_idx))
        if reuse:  # the encoder output does not change while decoding: its K/V were cached at the first step
            key = layer_cache.layers[self.layer_idx].keys
            value = layer_cache.layers[self.layer_idx].values
        else:
            source = key_value_states if cross else hidden_states
            key = self.k(source).view(batch, -1, self.n_kv_heads, d).transpose(1, 2)  # [b, G, m, d]
            value = self.v(source).view(batch, -1, self.n_kv_heads, d).transpose(1, 2)
            if layer_cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
                if cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True

        if position_bias is None:  # only the first layer computes it; the stack passes it on to the others
            keys = key.shape[-2]
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(length, keys, device=query.device, past_seen_tokens=past)
            else:
                position_bias = torch.zeros((1, self.n_heads, length, keys), device=query.device, dtype=query.dtype)
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True

        per_group = self.n_heads // self.n_kv_heads
        key = key.repeat_interleave(per_group, dim=1)  # [b, H, m, d]: contiguous groups
        value = value.repeat_interleave(per_group, dim=1)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        out, weights = attend(
            self,
            query,
            key,
            value,
            mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            position_bias=position_bias,
            **kwargs,
        )
        return self.o(out.reshape(batch, length, -1)), position_bias, weights


class T5GQAAttention(GroupedKV, modeling_t5.T5Attention):
    eager = staticmethod(modeling_t5.eager_attention_forward)


class MT5GQAAttention(GroupedKV, modeling_mt5.MT5Attention):
    eager = staticmethod(modeling_mt5.eager_attention_forward)


def _group_decoder(model: Any, attention: type) -> None:
    """Replace every decoder attention (self and cross) of a freshly built stock model by `attention`."""
    decoder_config = model.decoder.config
    for i, block in enumerate(model.decoder.block):
        block.layer[0].SelfAttention = attention(
            decoder_config, has_relative_attention_bias=i == 0, layer_idx=i, is_causal=True
        )
        block.layer[1].EncDecAttention = attention(decoder_config, layer_idx=i, is_causal=False)


class T5GQAForConditionalGeneration(modeling_t5.T5ForConditionalGeneration):
    """Stock T5ForConditionalGeneration with every decoder attention (self and cross) grouped."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _group_decoder(self, T5GQAAttention)
        self.post_init()


class MT5GQAForConditionalGeneration(modeling_mt5.MT5ForConditionalGeneration):
    """Stock MT5ForConditionalGeneration with every decoder attention (self and cross) grouped."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _group_decoder(self, MT5GQAAttention)
        self.post_init()
