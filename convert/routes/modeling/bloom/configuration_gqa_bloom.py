"""BLOOM configuration with a KV-head count (written by gqa-convert beside the converted weights)."""

from __future__ import annotations

from transformers import BloomConfig


class GQABloomConfig(BloomConfig):
    """BloomConfig plus `num_key_value_heads` (G): the n_head query heads share G key/value heads."""

    model_type = "gqa_bloom"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_head
        if self.n_head % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide n_head={self.n_head}")
