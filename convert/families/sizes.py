"""Sizes from a config: a transformers config object, or config.json as any transformers version wrote it.

Planning reads config.json itself (`config_view`), so that a weight-only conversion never imports transformers or
torch: legacy spellings (`torch_dtype`, `rope_theta`, `rope_scaling`, a top-level `partial_rotary_factor`, no
`head_dim`, a null KV-head count) are read the way transformers reads them, and what config.json omits takes the
family's defaults from its row.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from convert.errors import ConversionError
from convert.families.row import FalconShapes, Family, Shapes


def shapes_for(family: Family, config: Any) -> Shapes:
    """Every size from the config: heads, KV heads, head_dim (explicit where set), rotary width."""
    if family.read_shapes is not None:
        return family.read_shapes(config)
    H = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // H
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:  # per-layer-type rope (gemma3): same factor assumed
        rope = rope["full_attention"]
    factor = rope.get("partial_rotary_factor") if rope else None
    if not family.rope_by_layer_type:  # older configs keep it at the top level; per-layer-type rope never reads it
        factor = factor or getattr(config, "partial_rotary_factor", None)
    factor = factor or 1.0
    uses_alibi = bool(getattr(config, "alibi", False))
    rotary_dim = 0 if uses_alibi or not family.rotary else int(head_dim * factor)
    base = dict(
        num_heads=H,
        num_kv_heads=family.current_kv_heads(config),
        head_dim=int(head_dim),
        hidden=hidden,
        num_layers=int(config.num_hidden_layers),
        rotary_dim=rotary_dim,
    )
    if family.layout == "falcon":
        classic = not getattr(config, "new_decoder_architecture", False) and not config.multi_query
        return FalconShapes(**base, classic=classic)
    return Shapes(**base)


def output_shapes(s: Shapes, groups: int, raw_config: dict, family: Family) -> Shapes:
    """Shapes after conversion (falcon may change arrangement)."""
    if isinstance(s, FalconShapes):
        patched = family.patch_config(raw_config, groups)
        flags = [config_value(patched, family, k) for k in ("new_decoder_architecture", "multi_query")]
        classic = not any(flags)
        return FalconShapes(**{**s.__dict__, "num_kv_heads": groups, "classic": classic})
    return replace(s, num_kv_heads=groups)


def config_value(raw: dict, family: Family, key: str) -> Any:
    """A key of config.json under its name or an older spelling, else the family's default (None: derive it)."""
    for name in (key, *family.names.get(key, ())):
        if name in raw:
            return raw[name]
    return family.defaults.get(key)


def config_dtype(raw: dict) -> str | None:
    """The dtype config.json declares: `dtype` (transformers 5) or `torch_dtype` (earlier versions)."""
    value = raw.get("dtype") or raw.get("torch_dtype")
    return value if isinstance(value, str) else None


def _bad(path: Path, key: str, value: Any, want: str) -> ConversionError:
    return ConversionError(f"{path}: {key} is {value!r}, it must be {want}. Fix config.json or re-download it")


def _size(raw: dict, family: Family, key: str, path: Path, required: bool) -> int | None:
    value = config_value(raw, family, key)
    if value is None and not required:
        return None
    if value is None:
        raise ConversionError(f"{path} has no {key}: it is not a complete transformers config. Re-download it")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(path, key, value, "a positive integer")
    return value


def _rotary_factor(raw: dict, family: Family, path: Path) -> float:
    """The share of head_dim that rotary turns, where transformers looks for it: inside rope_scaling, else
    rope_parameters (per layer type for gemma3), else at the top level, else the family's default."""
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise _bad(path, "rope_parameters", rope, "an object")
    nested = bool(rope) and all(isinstance(v, dict) for v in rope.values())
    if family.rope_by_layer_type:  # only an entry for the full-attention layers counts; a flat one is not used
        rope = rope.get("full_attention", {}) if nested else {}
    elif nested:
        rope = rope.get("full_attention") or next(iter(rope.values()))
    factor = rope.get("partial_rotary_factor")
    if factor is None and not family.rope_by_layer_type:
        factor = config_value(raw, family, "partial_rotary_factor")
    if factor is None:
        return 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise _bad(path, "partial_rotary_factor", factor, "a number in (0, 1]")
    return float(factor)


def config_view(raw: dict, family: Family, path: Path) -> SimpleNamespace:
    """config.json as the attributes `shapes_for` reads, every value checked, no transformers needed."""
    heads = _size(raw, family, "num_attention_heads", path, True)
    view = SimpleNamespace(
        num_attention_heads=heads,
        hidden_size=_size(raw, family, "hidden_size", path, True),
        num_hidden_layers=_size(raw, family, "num_hidden_layers", path, True),
        head_dim=_size(raw, family, "head_dim", path, False),
        rope_parameters={"partial_rotary_factor": _rotary_factor(raw, family, path)},
    )
    for flag in ("alibi", "new_decoder_architecture", "multi_query"):
        value = config_value(raw, family, flag)
        if value is not None and not isinstance(value, bool):
            raise _bad(path, flag, value, "true or false")
        setattr(view, flag, bool(value))
    kv_value = _size(raw, family, family.kv_key, path, False)
    setattr(view, family.kv_key, heads if kv_value is None else kv_value)  # null: as many as heads
    kv = family.current_kv_heads(view)
    if kv > heads or heads % kv:
        raise ConversionError(
            f"{path}: {kv} KV heads ({family.kv_key}) must divide the {heads} attention heads. "
            "Fix config.json or re-download it"
        )
    return view
