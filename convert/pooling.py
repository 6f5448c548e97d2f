"""Head pooling from the weights alone, written once for both array libraries.

These functions use only `reshape`, `mean`, indexing and arithmetic, which torch tensors and numpy arrays share:
the torch methods (`convert.methods`) call them on float32 tensors, and the torch-free streaming path
(`convert.checkpoint`) calls them on float32 numpy arrays. Both give the same bits (tests/test_streaming.py).

The leading axis is the KV head; groups are contiguous runs of heads (see `convert.methods`):

    x        [Hkv, ...]            k0 k1 k2 k3 k4 k5
    grouped  [G, Hkv/G, ...]       [k0 k1] [k2 k3] [k4 k5]      (G = 3)
    pooled   [G, ...]              g0      g1      g2
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Array = Any  # a torch.Tensor or a numpy.ndarray, float32


def grouped(x: Array, groups: int) -> Array:
    """[Hkv, ...] -> [G, Hkv/G, ...]: contiguous runs of heads."""
    if x.shape[0] % groups:
        from .families import ConversionError

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
    diff = grouped(original, merged.shape[0]) - merged[:, None]
    return float((diff * diff).sum()) ** 0.5 / max(float((original * original).sum()) ** 0.5, 1e-12)


# Methods that pool every per-KV-head tensor (K, V, their biases and per-head norms) with one function of the
# weights alone: the streaming converter runs these without torch. Each has a class in convert.methods that
# calls the same function (tests/test_streaming.py checks the two paths write the same bytes).
WEIGHT_ONLY_POOLS: dict[str, Callable[[Array, int], Array]] = {"mean": mean_pool, "first": first_pool}
