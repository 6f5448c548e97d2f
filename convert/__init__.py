"""gqa-convert: turn multi-head attention checkpoints into grouped-query attention ones."""

__version__ = "0.1.0"
