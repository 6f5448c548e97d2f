"""The interface every merge method implements, and the one head permutation that leaves a model unchanged.

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
from typing import TYPE_CHECKING, Any, ClassVar

from convert.errors import ConversionError
from convert.families import Attention

if TYPE_CHECKING:
    from torch import Tensor


class Method(ABC):
    """One way of merging. `merge` returns the merged layer and per-layer statistics for the provenance file.

    One object serves one conversion (the registry makes a new one each time), so it may keep per-run state."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # False: only K/V (and their biases and norms) change, so q/o tensors are copied byte for byte, unread.
    rewrites_queries: ClassVar[bool] = True
    # A function [Hkv, ...] -> [G, ...] that does the whole merge on numpy arrays as on tensors (see
    # `convert.methods.array_pool`); None when the merge needs more than each tensor on its own.
    array_pool: ClassVar[Callable[[Any, int], Any] | None] = None

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


def permute_kv_heads(att: Attention, order: list[int] | Tensor) -> Attention:
    """Reorder KV heads (and the query heads that read each one, and their `o` columns) by `order`.

    New KV head j is old KV head order[j]; its block of H/Hkv query heads moves with it. The model computes
    exactly the same function afterwards: this is how a non-contiguous grouping is made contiguous.
    """
    import torch

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
