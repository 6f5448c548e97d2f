"""The pooling methods: each group's K/V heads become one from the weights alone (no data).

The array functions use only `reshape`, `mean`, indexing and arithmetic, which torch tensors and numpy arrays
share: the method classes call them on float32 tensors, and the torch-free streaming path
(`convert.pipeline.conversion`) calls them on float32 numpy arrays. Both give the same bits
(tests/pipeline/test_streaming.py). This module imports torch only inside the functions that need it, so that the
fast path can read `array_pool` without it.

The leading axis is the KV head; groups are contiguous runs of heads (see `convert.methods.base`):

    x        [Hkv, ...]            k0 k1 k2 k3 k4 k5
    grouped  [G, Hkv/G, ...]       [k0 k1] [k2 k3] [k4 k5]      (G = 3)
    pooled   [G, ...]              g0      g1      g2
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.families import Attention
from convert.methods.base import Method

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Array = Any  # a torch.Tensor or a numpy.ndarray, float32


def grouped(x: Array, groups: int) -> Array:
    """[Hkv, ...] -> [G, Hkv/G, ...]: contiguous runs of heads."""
    if x.shape[0] % groups:
        raise ConversionError(f"{groups} groups do not divide {x.shape[0]} KV heads")
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


def mean_pool(x: Array, groups: int) -> Array:
    """The paper's method: each group's heads are replaced by their mean. [Hkv, ...] -> [G, ...]"""
    return grouped(x, groups).mean(1)


def first_pool(x: Array, groups: int) -> Array:
    """The paper's ablation: each group keeps its first head (a view). [Hkv, ...] -> [G, ...]"""
    return grouped(x, groups)[:, 0]


def relative_error(original: Array, merged: Array) -> float:
    """||original - repeat(merged)|| / ||original|| over a layer's KV heads (broadcast, no repeated copy)."""
    return ratio_of_norms(*squared_errors(original, merged))


def squared_errors(original: Array, merged: Array) -> tuple[float, float]:
    """(||original - repeat(merged)||², ||original||²): sums that add up over blocks of columns."""
    return _squares(grouped(original, merged.shape[0]) - merged[:, None]), _squares(original)


def ratio_of_norms(diff_squares: float, original_squares: float) -> float:
    return diff_squares**0.5 / max(original_squares**0.5, 1e-12)


def _squares(x: Array) -> float:
    """Sum of squares of all entries as one dot product: no squared copy (on the numpy path this step was most of
    the pooling time of a layer)."""
    flat = x.reshape(-1)
    return float(flat @ flat)


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
        import torch

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


class Mean(HeadPool):
    """The paper's method: each group's K and V heads are replaced by their mean."""

    name = "mean"
    summary = "mean-pool the K/V heads of each group (Ainslie et al. 2023)"
    array_pool = staticmethod(mean_pool)

    def pool(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        return mean_pool(x, groups)


class First(HeadPool):
    """Ablation from the paper: keep the first head of each group."""

    name = "first"
    summary = "keep the first K/V head of each group (paper ablation)"
    # Norm weights too are the first head's here, so one function does the whole merge.
    array_pool = staticmethod(first_pool)

    def pool(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        return first_pool(x, groups).clone()

    def pool_norm(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        return self.pool(x, groups, gen)


class Random(HeadPool):
    """Ablation from the paper: fresh random heads, with the mean and spread of the group's source heads."""

    name = "random"
    summary = "random K/V heads scaled like the source heads of each group (paper ablation)"

    def pool(self, x: Tensor, groups: int, gen: torch.Generator) -> Tensor:
        import torch

        g = grouped(x, groups)  # [G, n, ...]
        flat = g.reshape(groups, -1)
        mean = flat.mean(1).reshape(groups, *([1] * (x.dim() - 1)))
        std = flat.std(1).reshape(groups, *([1] * (x.dim() - 1)))
        noise = torch.randn((groups, *x.shape[1:]), generator=gen)
        return mean + std * noise


# The methods of this module the numpy path can run (each class's `array_pool`), for code that wants the table.
WEIGHT_ONLY_POOLS: dict[str, Callable[[Array, int], Array]] = {
    cls.name: cls.array_pool for cls in (Mean, First, Random) if cls.array_pool is not None
}
