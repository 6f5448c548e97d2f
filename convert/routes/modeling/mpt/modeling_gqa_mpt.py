"""MPT with grouped-query attention: the stock MPT classes with only the attention replaced.

`Wqkv` rows are [q (H heads) | k (G heads) | v (G heads)]. The ALiBi slopes stay per query head; K/V keep G
heads in the cache and are repeated to H only inside attention. Eager only, like stock MPT (its model passes a
boolean mask that is True where attention is blocked). Written by gqa-convert beside the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MptForCausalLM, MptModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mpt.modeling_mpt import MptAttention

from .configuration_gqa_mpt import GQAMptConfig
from .gqa_attention import eager_gqa_attention, implementation


class GQAMptAttention(MptAttention):
    def __init__(self, config: GQAMptConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.config = config  # implementation() reads the attention implementation from it
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
        # looked up here, in forward, where vLLM's Transformers backend finds the call it serves
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation(self, True), eager_gqa_attention)
        out, weights = attention_interface(
            self, q, k, v, mask, scaling=self.softmax_scale, dropout=dropout, position_bias=bias
        )  # [batch, q, H, d] (vLLM: [tokens, H * d])
        return self.out_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights


class GQAMptModel(MptModel):
    """The base model (AutoModel), which vLLM's Transformers backend serves (with the gqa-convert plugin)."""

    config_class = GQAMptConfig
    _supports_attention_backend = True  # the attention goes through transformers' interface

    def __init__(self, config: GQAMptConfig):
        super().__init__(config)
        for i, block in enumerate(self.blocks):
            block.attn = GQAMptAttention(config, layer_idx=i)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, **kwargs):
        # ALiBi needs no positions; vLLM's Transformers backend passes them to every model it serves
        if self.config._attn_implementation == "vllm":
            return self.forward_in_vllm(input_ids, inputs_embeds)
        return super().forward(input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def forward_in_vllm(self, input_ids, inputs_embeds) -> tuple[torch.Tensor]:
        """The layers without a mask or bias: vLLM's attention holds the causal mask, the ALiBi slopes, the cache.

        (MptModel.forward builds a boolean mask from transformers' mask function, which has none for vLLM.)
        """
        hidden = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        for block in self.blocks:
            hidden = block(hidden, position_bias=None, attention_mask=None)[0]
        return (self.norm_f(hidden),)


class GQAMptForCausalLM(MptForCausalLM):
    config_class = GQAMptConfig
    _supports_attention_backend = True

    def __init__(self, config: GQAMptConfig):
        super().__init__(config)
        for i, block in enumerate(self.transformer.blocks):
            block.attn = GQAMptAttention(config, layer_idx=i)
        self.post_init()
