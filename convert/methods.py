"""Merge methods: how the KV heads of a group become one. Pure functions on `Attention`, one class per method.

Groups are contiguous, because transformers' `repeat_kv` gives query head i the KV head i // (H/G):

    KV heads   k0 k1 | k2 k3 | k4 k5        Hkv = 6, G = 3, n = Hkv/G = 2 heads per group
    groups     [ g0  ] [ g1  ] [ g2  ]      -> pooled g0 g1 g2
    queries    q0..q3 | q4..q7 | q8..q11    H = 12: query heads follow their KV head into its group

A method that wants another grouping permutes heads first (`permute_kv_heads`), which leaves the model's function
unchanged, and then merges contiguous runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from .families import Attention, ConversionError
from .pooling import first_pool, grouped, mean_pool, relative_error


class Method(ABC):
    """One way of merging. `merge` returns the merged layer and per-layer statistics for the provenance file."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # False: only K/V (and their biases and norms) change, so q/o tensors are copied byte for byte, unread.
    rewrites_queries: ClassVar[bool] = True

    @abstractmethod
    def merge(
        self, att: Attention, groups: int, *, layer: int, seed: int, **context: Any
    ) -> tuple[Attention, dict]: ...

    def layer_contexts(self, source: Any, groups: int, seed: int, **options: Any) -> Callable[[int], dict] | None:
        """For methods that need data: a function giving each layer's extra `merge` arguments, asked for in layer
        order. Weight-only methods need none."""
        if options:
            raise ConversionError(f"method {self.name!r} takes no options, got {sorted(options)}")
        return None

    def finish(self, folder: Path, report: Any) -> None:
        """Write method-specific files (plots, statistics) into the finished output folder."""


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConversionError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


class HeadPool(Method):
    """A method that pools each per-KV-head tensor on its own, from the weights alone (no data)."""

    rewrites_queries = False

    @abstractmethod
    def pool(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        """[Hkv, ...] -> [G, ...]."""

    def pool_norm(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        # Per-head norm weights are scales, not projections: every method averages them.
        return mean_pool(x, groups)

    def merge(self, att: Attention, groups: int, *, layer: int, seed: int, **context: Any) -> tuple[Attention, dict]:
        # One generator per layer, so a layer's result does not depend on the order layers are processed in.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        merged = att.replace(
            k=self.pool(att.k, groups, gen),
            v=self.pool(att.v, groups, gen),
            k_bias=None if att.k_bias is None else self.pool(att.k_bias, groups, gen),
            v_bias=None if att.v_bias is None else self.pool(att.v_bias, groups, gen),
            k_norm=None if att.k_norm is None else self.pool_norm(att.k_norm, groups, gen),
        )
        stats = {"k_rel_err": relative_error(att.k, merged.k), "v_rel_err": relative_error(att.v, merged.v)}
        return merged, stats


@register
class Mean(HeadPool):
    """The paper's method: each group's K and V heads are replaced by their mean."""

    name = "mean"
    summary = "mean-pool the K/V heads of each group (Ainslie et al. 2023)"

    def pool(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        return mean_pool(x, groups)


@register
class First(HeadPool):
    """Ablation from the paper: keep the first head of each group."""

    name = "first"
    summary = "keep the first K/V head of each group (paper ablation)"

    def pool(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        return first_pool(x, groups).clone()

    def pool_norm(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        return self.pool(x, groups, gen)


@register
class Random(HeadPool):
    """Ablation from the paper: fresh random heads, with the mean and spread of the group's source heads."""

    name = "random"
    summary = "random K/V heads scaled like the source heads of each group (paper ablation)"

    def pool(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        g = grouped(x, groups)  # [G, n, ...]
        flat = g.reshape(groups, -1)
        mean = flat.mean(1).reshape(groups, *([1] * (x.dim() - 1)))
        std = flat.std(1).reshape(groups, *([1] * (x.dim() - 1)))
        noise = torch.randn((groups, *x.shape[1:]), generator=gen)
        return mean + std * noise


def permute_kv_heads(att: Attention, order: list[int] | Tensor) -> Attention:
    """Reorder KV heads (and the query heads that read each one, and their `o` columns) by `order`.

    New KV head j is old KV head order[j]; its block of H/Hkv query heads moves with it. The model computes
    exactly the same function afterwards: this is how a non-contiguous grouping is made contiguous.
    """
    order = torch.as_tensor(order, dtype=torch.long)
    n = att.num_heads // att.num_kv_heads
    q_order = (order[:, None] * n + torch.arange(n)).reshape(-1)  # query heads follow their KV head

    def take(x: Tensor | None, idx: Tensor, dim: int = 0) -> Tensor | None:
        return None if x is None else x.index_select(dim, idx)

    return att.replace(
        q=take(att.q, q_order),
        q_bias=take(att.q_bias, q_order),
        q_norm=take(att.q_norm, q_order),
        o=take(att.o, q_order, dim=1),
        k=take(att.k, order),
        v=take(att.v, order),
        k_bias=take(att.k_bias, order),
        v_bias=take(att.v_bias, order),
        k_norm=take(att.k_norm, order),
    )


# Methods kept in modules of their own register themselves when imported.
from . import calibrate  # noqa: E402,F401  ("calibrated")
