"""The conversion itself, independent of files: check G, merge one layer, convert a model held in memory."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.families import Family, Shapes, family_for, output_shapes, shapes_for
from convert.families.mha import modeling_template
from convert.io.safetensors import nbytes
from convert.methods import get_method

if TYPE_CHECKING:  # imported where used, so that planning a conversion does not wait for torch
    import torch
    from torch import Tensor

    from convert.methods import Method


def check_groups(groups: int, s: Shapes) -> None:
    """G must be a positive divisor of the current KV-head count (GQA can be regrouped, never split)."""
    if groups < 1:
        raise ConversionError(f"--num-kv-heads must be at least 1, got {groups}")
    if groups > s.num_kv_heads:
        raise ConversionError(
            f"--num-kv-heads {groups} is larger than the current {s.num_kv_heads} KV heads: merging can only "
            f"reduce them. Choose one of {valid_groups(s)}"
        )
    if s.num_kv_heads % groups:
        raise ConversionError(
            f"--num-kv-heads {groups} does not divide the {s.num_kv_heads} KV heads ({s.num_heads} query heads): "
            f"groups must have equal sizes. Choose one of {valid_groups(s)}"
        )


def valid_groups(s: Shapes) -> list[int]:
    return [g for g in range(1, s.num_kv_heads + 1) if s.num_kv_heads % g == 0]


def kv_cache_bytes_per_token(s: Shapes, groups: int, dtype: Any) -> int:
    """K and V, every layer, one token: 2 * layers * G * head_dim * element size (dtype: torch or safetensors)."""
    return 2 * s.num_layers * groups * s.head_dim * nbytes(dtype, ())


def convert_layer(
    family: Family,
    method: Method,
    layer: int,
    get: Callable[[str], Tensor],
    keys: list[str],
    s_in: Shapes,
    s_out: Shapes,
    seed: int,
    context: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict]:
    """Merge one layer: checkpoint tensors in, float32 checkpoint tensors out (same names), plus statistics."""
    att = family.split(layer, get, keys, s_in)
    merged, stats = method.merge(att, s_out.num_kv_heads, layer=layer, seed=seed, **(context or {}))
    return family.join(layer, merged, keys, s_out), stats


def patched_config(config: Any, family: Family, groups: int) -> Any:
    """A deep copy of a transformers config with the fields G changes (usually only the KV-head count)."""
    raw = config.to_dict()
    new = copy.deepcopy(config)
    for key, value in family.patch_config(raw, groups).items():
        if raw.get(key) != value:
            setattr(new, key, value)
    return new


def convert_model(
    model: torch.nn.Module,
    num_kv_heads: int,
    method: str = "mean",
    seed: int = 0,
    layer_context: Callable[[int], dict] | None = None,
) -> torch.nn.Module:
    """Convert a loaded transformers causal LM in memory; returns a new model of the same class.

    The input model is not modified. Weights keep their dtype; merging runs in float32.
    """
    import torch

    with torch.no_grad():
        config = model.config
        family = family_for(getattr(config, "model_type", None))
        s_in = shapes_for(family, config)
        check_groups(num_kv_heads, s_in)
        if modeling_template(family, num_kv_heads, s_in.num_heads):  # type(model) cannot hold these KV heads
            raise ConversionError(
                f"{config.model_type} with {num_kv_heads} KV heads needs modeling code shipped with the checkpoint: "
                "save the model and convert the folder with `gqa-convert convert --write-modeling-code`"
            )
        raw_config = config.to_dict()
        s_out = output_shapes(s_in, num_kv_heads, raw_config, family)
        merger = get_method(method)
        state = model.state_dict()
        present = set(state)
        new_state = dict(state)
        for layer in range(s_in.num_layers):
            keys = family.attention_keys(layer, present)
            ctx = layer_context(layer) if layer_context is not None else None
            out, _ = convert_layer(family, merger, layer, state.__getitem__, keys, s_in, s_out, seed, ctx)
            for key, tensor in out.items():
                new_state[key] = tensor.to(state[key].dtype)
        new_config = patched_config(config, family, num_kv_heads)
        dtype = next(model.parameters()).dtype
        new_model = type(model)(new_config).to(dtype)
        new_model.load_state_dict(new_state, strict=True)
        new_model.generation_config = copy.deepcopy(model.generation_config)
        new_model.eval()
        return new_model
