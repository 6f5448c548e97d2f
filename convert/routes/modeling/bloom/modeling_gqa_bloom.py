"""BLOOM with grouped-query attention: the stock BLOOM classes with only the attention replaced.

`query_key_value` rows are [G, H/G + 2, d]: each group's query heads, then its key head, then its value head (at
G = H this is BLOOM's own [H, 3, d]). The ALiBi slopes stay per query head; K/V keep G heads in the cache and are
repeated to H only inside attention. eager and sdpa both work (stock BLOOM is eager only). Written by gqa-convert.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BloomForCausalLM
from transformers.models.bloom.modeling_bloom import BloomAttention, BloomModel, BloomPreTrainedModel, dropout_add

from .configuration_gqa_bloom import GQABloomConfig
from .gqa_attention import attend


class GQABloomAttention(BloomAttention):
    def __init__(self, config: GQABloomConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.config = config  # attend() reads the attention implementation from it
        self.is_causal = True
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        rows = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.query_key_value = nn.Linear(self.hidden_size, rows, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,  # [batch * H, 1, k]
        attention_mask: torch.Tensor | None,
        layer_past=None,
        **kwargs,
    ):
        batch, seq, _ = hidden_states.shape
        G, d = self.num_key_value_heads, self.head_dim
        qkv = self.query_key_value(hidden_states).view(batch, seq, G, self.num_key_value_groups + 2, d)
        q = qkv[..., :-2, :].reshape(batch, seq, self.num_heads, d).transpose(1, 2)  # [batch, H, seq, d]
        k = qkv[..., -2, :].transpose(1, 2)  # [batch, G, seq, d]
        v = qkv[..., -1, :].transpose(1, 2)
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_idx)  # G heads in the cache
        bias = alibi.view(batch, self.num_heads, 1, -1)  # per query head
        dropout = self.attention_dropout.p if self.training else 0.0
        out, weights = attend(self, q, k, v, attention_mask, self.inv_norm_factor, dropout, position_bias=bias)
        out = self.dense(out.reshape(batch, seq, -1))
        return dropout_add(out, residual, self.hidden_dropout, self.training), weights


class GQABloomModel(BloomModel):
    config_class = GQABloomConfig
    _supports_sdpa = True  # the attention goes through transformers' interface, ALiBi as a position bias

    def __init__(self, config: GQABloomConfig):
        super().__init__(config)
        for i, block in enumerate(self.h):
            block.self_attention = GQABloomAttention(config, layer_idx=i)
        self.post_init()


class GQABloomForCausalLM(BloomForCausalLM):
    config_class = GQABloomConfig
    _supports_sdpa = True

    def __init__(self, config: GQABloomConfig):
        # BloomForCausalLM.__init__ would build a stock BloomModel, which refuses sdpa: the same three steps here
        BloomPreTrainedModel.__init__(self, config)
        self.transformer = GQABloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
