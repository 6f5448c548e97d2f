"""MPT with grouped-query attention: the stock MPT classes with only the attention replaced.

`Wqkv` rows are [q (H heads) | k (G heads) | v (G heads)]. The ALiBi slopes stay per query head; K/V keep G
heads in the cache and are repeated to H only inside attention. Eager only, like stock MPT (its model passes a
boolean mask that is True where attention is blocked). Written by gqa-convert beside the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MptForCausalLM
from transformers.models.mpt.modeling_mpt import MptAttention

from .configuration_gqa_mpt import GQAMptConfig
from .gqa_attention import attend


class GQAMptAttention(MptAttention):
    def __init__(self, config: GQAMptConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.config = config  # attend() reads the attention implementation from it
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.n_heads // self.num_key_value_heads
        kv = self.num_key_value_heads * self.head_dim
        self.split_sizes = (self.hidden_size, kv, kv)
        self.Wqkv = nn.Linear(self.hidden_size, self.hidden_size + 2 * kv, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor, cache=None, attention_mask=None, **kw):
        cache = cache if cache is not None else kw.pop("past_key_values", None)
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (x.view(shape).transpose(1, 2) for x in qkv.split(self.split_sizes, dim=2))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # G heads in the cache
        bias = None
        if position_bias is not None:  # [H, 1, max_seq_len]: the last k columns belong to the k keys
            bias = position_bias[None, :, :, max(0, position_bias.size(2) - k.shape[2]) :]
        mask = None if attention_mask is None else ~attention_mask  # MPT's mask: True where attention is blocked
        dropout = self.attn_dropout_p if self.training else 0.0
        out, weights = attend(self, q, k, v, mask, self.softmax_scale, dropout, position_bias=bias)
        return self.out_proj(out.reshape(*out.shape[:-2], -1)), weights


class GQAMptForCausalLM(MptForCausalLM):
    config_class = GQAMptConfig

    def __init__(self, config: GQAMptConfig):
        super().__init__(config)
        for i, block in enumerate(self.transformer.blocks):
            block.attn = GQAMptAttention(config, layer_idx=i)
        self.post_init()
