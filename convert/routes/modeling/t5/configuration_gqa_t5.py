"""T5 configuration with a KV-head count for the decoder (written by gqa-convert beside the converted weights)."""

from __future__ import annotations

from transformers import T5Config


class GQAT5Config(T5Config):
    """T5Config plus `num_key_value_heads` (G): in the decoder's self- and cross-attention, num_heads query heads
    share G key/value heads. The encoder keeps num_heads of each."""

    model_type = "gqa_t5"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_heads
        if self.num_key_value_heads < 1 or self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide num_heads={self.num_heads}")
