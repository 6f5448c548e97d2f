"""gqa-convert: turn multi-head attention checkpoints into grouped-query attention ones."""

__version__ = "0.1.0"

from .checkpoint import Report, convert_checkpoint, describe
from .core import convert_model, kv_cache_bytes_per_token
from .families import FAMILIES, ConversionError, supported_model_types

__all__ = [
    "__version__",
    "convert_checkpoint",
    "convert_model",
    "describe",
    "kv_cache_bytes_per_token",
    "Report",
    "ConversionError",
    "FAMILIES",
    "METHODS",
    "supported_model_types",
]


def __getattr__(name: str):
    # The method registry imports torch; importing this package does not (the CLI starts converting first).
    if name == "METHODS":
        from .methods import METHODS

        return METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
