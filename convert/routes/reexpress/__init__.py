"""Re-expression: classic multi-head checkpoints read as a stock transformers class that can hold G KV heads.

GPT-NeoX, GPT-J, GPT-2 and OPT have no KV-head count in their transformers classes, but each computes exactly the
same function as a class that has one, after a re-layout of the weights (un-fused projections, LayerNorms folded
into the projections that read them, rotary rows permuted, Conv1D transposed). A `Route` turns a source checkpoint
into a *view* in that target class: every target tensor is either a source tensor under a new name (the same bytes,
still copied raw by the streaming writer) or derived, computed in float32 from named source tensors only when read
(one tensor at a time). The converter then runs the target family's row on the view, so K/V are pooled once, in the
re-expressed layout: pooling commutes with the folds and permutations, which act on every head alike.

Each route is one small module: its key table is data (`Map` rows: target name, transform, source names) and its
target config.json is a pure function of the source config.
"""

from __future__ import annotations

import re
from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.io.safetensors import TensorInfo, read_tensor
from convert.routes.reexpress import gpt2, gptj, neox, opt
from convert.routes.reexpress.route import Map, Route, RouteInfo, Transform

if TYPE_CHECKING:
    from torch import Tensor


def _routes() -> tuple[Route, ...]:
    return (*neox.ROUTES, gptj.ROUTE, gpt2.ROUTE, opt.ROUTE)


def source_types() -> list[str]:
    """model_types that a stock route may read (whether one fits is `route_for`'s answer)."""
    return sorted({r.source_type for r in _routes()})


def route_for(raw: dict, config: Any) -> Route | None:
    """The stock route for this source, or None: its family is stored as it is, or no route fits this variant
    (opt-350m's post-LN layers, ...), and the family's own row reads it (shipped code below H)."""
    return next((r for r in _routes() if r.source_type == raw.get("model_type") and r.applies(config)), None)


def is_route_source(raw: dict) -> bool:
    return raw.get("model_type") in source_types()


# ---------------------------------------------------------------------------------------------------------------
# The view


def _derive(fn: Transform, z: SimpleNamespace, infos: tuple[TensorInfo | None, ...]) -> Tensor:
    """Read the named source tensors as float32 and apply `fn` (float32 out: the writer casts once)."""
    return fn(z, *(None if i is None else read_tensor(i).float() for i in infos)).float().contiguous()


def _meta_shape(fn: Transform, z: SimpleNamespace, infos: tuple[TensorInfo | None, ...]) -> tuple[int, ...]:
    """The shape `fn` gives, from the source shapes alone (meta tensors: no data read)."""
    import torch

    metas = (None if i is None else torch.empty(i.shape, device="meta") for i in infos)
    return tuple(fn(z, *metas).shape)


def build_view(
    route: Route, config: Any, raw: dict, tensors: dict[str, TensorInfo]
) -> tuple[dict, dict[str, TensorInfo], RouteInfo]:
    """The target config.json and every target tensor (renamed source ones, derived ones), checking that every
    source tensor is used or is a known buffer: nothing is dropped silently."""
    tensors = _add_base_prefix(route, tensors)
    z = SimpleNamespace(**route.sizes(config))
    used: set[str] = set()
    ignored = sorted(k for k in tensors if any(re.search(p, k) for p in route.ignore))
    default_st = _main_float(tensors)
    out: dict[str, TensorInfo] = {}
    rows = [(m, {"i": i}) for i in range(z.L) for m in route.layer_maps(config)]
    rows += [(m, {}) for m in route.global_maps(config)]
    for m, subst in rows:
        target = m.target.format(**subst)
        infos: list[TensorInfo | None] = []
        for s in m.sources:
            name = s.lstrip("?").format(**subst)
            if name in tensors:
                infos.append(tensors[name])
                used.add(name)
            elif s.startswith("?"):
                infos.append(None)
            else:
                raise ConversionError(
                    f"{route.source_type} checkpoint lacks {name}, which the {route.name} route needs: "
                    "the config and the weights disagree (fix config.json or re-download the weights)"
                )
        if m.fn is None:
            if infos[0] is not None:
                out[target] = infos[0]  # same bytes: copied raw
            continue
        present = [i for i in infos if i is not None]
        st = present[0].st if present else default_st
        fn = partial(_derive, m.fn, z, tuple(infos))
        shape = _meta_shape(m.fn, z, tuple(infos))
        anchor = present[0].file if present else next(iter(tensors.values())).file
        out[target] = TensorInfo(anchor, st, shape, derive=fn)
    left = sorted(set(tensors) - used - set(ignored))
    if left:
        raise ConversionError(
            f"{route.name}: the checkpoint holds tensors the route does not know ({', '.join(left[:6])}"
            f"{', ...' if len(left) > 6 else ''}); refusing rather than dropping them. Is it a {route.source_type} "
            "checkpoint saved by transformers?"
        )
    info = RouteInfo(route.name, route.source_type, route.target_type, route.load_with)
    info.source_bytes = sum(t.nbytes for t in tensors.values())
    if route.summary:
        info.notes.append(f"route {route.name}: {route.summary}")
    if ignored:
        why = sorted({route.ignore[p] for k in ignored for p in route.ignore if re.search(p, k)})
        info.notes.append(f"{len(ignored)} buffer tensor(s) not written ({'; '.join(why)})")
    return route.target_config(config, raw), out, info


def _add_base_prefix(route: Route, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    if route.base_prefix is None:
        return tensors
    prefix, lacking = route.base_prefix
    return {(prefix + k if re.match(lacking, k) else k): v for k, v in tensors.items()}


def _main_float(tensors: dict[str, TensorInfo]) -> str:
    """The checkpoint's dtype (of its largest floating tensor): constants without a source get it."""
    floats = [t for t in tensors.values() if t.st in ("F32", "F16", "BF16", "F64")]
    return max(floats, key=lambda t: t.nbytes).st if floats else "F32"


def target_config_object(raw: dict) -> Any:
    """transformers' config object for a target config.json (the calibrated method builds the target class)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    return AutoConfig.for_model(raw["model_type"], **kwargs)


__all__ = [
    "Map",
    "Route",
    "RouteInfo",
    "build_view",
    "route_for",
    "source_types",
    "is_route_source",
    "target_config_object",
]
