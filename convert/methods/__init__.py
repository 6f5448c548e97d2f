"""Merge methods: how the KV heads of a group become one.

This module is the registry, and imports neither torch nor any method: the CLI lists the names from it, and the
torch-free fast path asks it whether a method pools from the weights alone. Each name points at a class in a module
of this package (`convert.methods.pooling`, `convert.methods.calibrated`); the class is imported on first use, and
every `get_method` call makes a new object, so two conversions in one process share no per-run state.

Adding a method: write its class (a `convert.methods.base.Method`) in a module here, and add its name to `REGISTRY`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError

if TYPE_CHECKING:
    from convert.methods.base import Method

# name -> "module:Class", in the order the CLI lists them.
REGISTRY: dict[str, str] = {
    "mean": "convert.methods.pooling:Mean",
    "first": "convert.methods.pooling:First",
    "random": "convert.methods.pooling:Random",
    "calibrated": "convert.methods.calibrated:Calibrated",
    "reconstructed": "convert.methods.reconstructed:Reconstructed",
}


def method_names() -> list[str]:
    return list(REGISTRY)


def method_module(name: str) -> str:
    """The module holding method `name` (the registry itself for an unknown name: `get_method` then says so)."""
    return REGISTRY[name].split(":")[0] if name in REGISTRY else __name__


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ConversionError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_method(name: str) -> Method:
    """A new object of method `name`: per-run state (calibration activations, options) belongs to one conversion."""
    return method_class(name)()


def array_pool(name: str) -> Callable[[Any, int], Any] | None:
    """The function pooling every per-KV-head tensor of method `name` from the weights alone, written for numpy
    arrays and torch tensors alike ([Hkv, ...] -> [G, ...]), or None when the method needs more than that (or is
    unknown). Only methods declared in torch-free modules can have one: asking never imports torch."""
    if name not in REGISTRY or not REGISTRY[name].startswith("convert.methods.pooling:"):
        return None
    return method_class(name).array_pool


class _Methods(Mapping):
    """name -> a new method object on every lookup (iterating the names imports nothing)."""

    def __getitem__(self, name: str) -> Method:
        if name not in REGISTRY:
            raise KeyError(name)
        return get_method(name)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


METHODS: Mapping[str, Method] = _Methods()


def __getattr__(name: str) -> Any:
    # The torch-side names, for `from convert.methods import Method, HeadPool, permute_kv_heads`.
    if name in ("Method", "permute_kv_heads"):
        return getattr(importlib.import_module(".base", __name__), name)
    if name in ("HeadPool", "WEIGHT_ONLY_POOLS"):
        return getattr(importlib.import_module(".pooling", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
