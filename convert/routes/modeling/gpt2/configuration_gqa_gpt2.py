"""GPT-2 configuration with a KV-head count (written by gqa-convert beside the converted weights)."""

from __future__ import annotations

from transformers import GPT2Config


class GQAGPT2Config(GPT2Config):
    """GPT2Config plus `num_key_value_heads` (G): query heads n_head share G key/value heads."""

    model_type = "gqa_gpt2"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_head
        if self.n_head % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide n_head={self.n_head}")
