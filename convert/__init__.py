"""gqa-convert: turn multi-head attention checkpoints into grouped-query attention ones."""

from convert.errors import ConversionError
from convert.families import FAMILIES, supported_model_types
from convert.methods import METHODS
from convert.pipeline.conversion import convert_checkpoint
from convert.pipeline.merge import convert_model, kv_cache_bytes_per_token
from convert.pipeline.report import Report
from convert.pipeline.source import describe
from convert.version import __version__

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
