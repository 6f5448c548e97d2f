"""OPT with grouped-query attention: the stock OPT classes with only the attention replaced.

k_proj and v_proj have G heads ([G * d, hidden]); everything else, tensor names and OPT's pre- or post-LN layout
included, is OPT's own. The cache holds G heads. Written by gqa-convert beside the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import OPTForCausalLM
from transformers.models.opt.modeling_opt import OPTAttention

from .configuration_gqa_opt import GQAOPTConfig
from .gqa_attention import attend


class GQAOPTAttention(OPTAttention):
    def __init__(self, config: GQAOPTConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        kv = self.num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, kv, bias=self.enable_bias)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("output_attentions", None)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        # OPT scales the queries before the product (and attends with scaling 1): the same order here
        q = (self.q_proj(hidden_states) * self.scaling).view(shape).transpose(1, 2)  # [batch, H, seq, d]
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # [batch, G, seq, d]
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # G heads in the cache
        dropout = self.dropout if self.training else 0.0
        out, weights = attend(self, q, k, v, attention_mask, 1.0, dropout, **kwargs)
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        return self.out_proj(out), weights


class GQAOPTForCausalLM(OPTForCausalLM):
    config_class = GQAOPTConfig

    def __init__(self, config: GQAOPTConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.decoder.layers):
            layer.self_attn = GQAOPTAttention(config, layer_idx=i)
        self.post_init()
