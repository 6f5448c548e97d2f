"""Where each transformers family keeps its attention weights, as data.

Every family is one `Family` row (`table.FAMILIES`): the prefix of a layer's attention tensors, the projection
names, which weight layout it uses, its q/k norm and rotary layout, and how its config.json names and defaults the
sizes. The converter never branches on `model_type`; it reads the row and uses the layout's `split`/`join` pair to
move between the checkpoint tensors and the canonical per-head form (`Attention`) that the merge methods work on.

    row.py     the Family class, Attention, Shapes and the fused layouts
    table.py   the rows
    sizes.py   Shapes from a transformers config or straight from config.json
"""

from convert.families.row import QK_NORM_KINDS, ROTARY_LAYOUTS, Attention, FalconShapes, Family, Getter, Shapes
from convert.families.sizes import config_dtype, config_value, config_view, output_shapes, shapes_for
from convert.families.table import (
    FAMILIES,
    INTERLEAVED_ROTARY,
    QK_NORM_FAMILIES,
    family_for,
    stock_kv_model_types,
    supported_model_types,
)

__all__ = [
    "FAMILIES",
    "INTERLEAVED_ROTARY",
    "QK_NORM_FAMILIES",
    "QK_NORM_KINDS",
    "ROTARY_LAYOUTS",
    "Attention",
    "FalconShapes",
    "Family",
    "Getter",
    "Shapes",
    "config_dtype",
    "config_value",
    "config_view",
    "family_for",
    "output_shapes",
    "shapes_for",
    "stock_kv_model_types",
    "supported_model_types",
]
