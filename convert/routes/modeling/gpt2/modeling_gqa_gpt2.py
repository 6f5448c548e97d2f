"""GPT-2 with grouped-query attention: the stock GPT-2 classes with only the attention replaced.

`c_attn` (a Conv1D, weight [hidden, out]) projects to [q (H heads) | k (G heads) | v (G heads)]; everything else,
tensor names included, is GPT-2's own. The cache holds G heads. Written by gqa-convert beside the weights.
"""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import Conv1D, GPT2Attention

from .configuration_gqa_gpt2 import GQAGPT2Config
from .gqa_attention import attend


class GQAGPT2Attention(GPT2Attention):
    def __init__(self, config: GQAGPT2Config, layer_idx: int | None = None):
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        kv = self.num_key_value_heads * self.head_dim
        self.split_sizes = (self.embed_dim, kv, kv)
        self.c_attn = Conv1D(self.embed_dim + 2 * kv, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        q, k, v = self.c_attn(hidden_states).split(self.split_sizes, dim=2)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (x.view(shape).transpose(1, 2) for x in (q, k, v))  # [batch, heads, seq, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # G heads in the cache
        dropout = self.attn_dropout.p if self.training else 0.0
        kwargs.pop("use_cache", None)
        out, weights = attend(self, q, k, v, attention_mask, self.scaling, dropout, **kwargs)
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.c_proj(out)), weights


class GQAGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = GQAGPT2Config

    def __init__(self, config: GQAGPT2Config):
        super().__init__(config)
        for i, block in enumerate(self.transformer.h):
            block.attn = GQAGPT2Attention(config, layer_idx=i)
        self.post_init()
