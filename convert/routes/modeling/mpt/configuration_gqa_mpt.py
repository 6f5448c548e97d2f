"""MPT configuration with a KV-head count (written by gqa-convert beside the converted weights)."""

from __future__ import annotations

from transformers import MptConfig


class GQAMptConfig(MptConfig):
    """MptConfig plus `num_key_value_heads` (G): the n_heads query heads share G key/value heads."""

    model_type = "gqa_mpt"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_heads
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide n_heads={self.n_heads}")
