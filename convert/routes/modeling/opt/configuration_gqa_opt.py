"""OPT configuration with a KV-head count (written by gqa-convert beside the converted weights)."""

from __future__ import annotations

from transformers import OPTConfig


class GQAOPTConfig(OPTConfig):
    """OPTConfig plus `num_key_value_heads` (G): num_attention_heads query heads share G key/value heads."""

    model_type = "gqa_opt"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
