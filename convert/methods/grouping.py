"""Similarity grouping: which KV heads share a group, chosen so that the calibrated merge loses least."""

from __future__ import annotations

import math
from itertools import combinations

import torch
from torch import Tensor

from convert.families import Attention
from convert.methods.linalg import (
    LayerMath,
    Shift,
    _cross,
    _key_nr_problem,
    _key_rot_problem,
    _Prepared,
    _value_problem,
)


class GroupCost:
    """Cost of merging a set of KV heads: the weighted energy lost on keys and values, each as a share of the
    layer's total, from Gram matrices over all heads computed once (a group's Gram is a sub-block)."""

    def __init__(self, att: Attention, lm: LayerMath):
        p = _Prepared(att, lm)
        self.Hkv, self.d, self.m = att.num_kv_heads, att.q.shape[1], len(p.nr)
        heads = list(range(self.Hkv))
        self.grams: list[tuple[Tensor, int, int]] = []  # (gram, dims per head, rank kept)
        parts = [(_value_problem, self.d, "v", None)]
        if len(p.re):
            parts.append((_key_rot_problem, 1, "k", lm.key_shift(lm.means)))
        if len(p.nr):
            nr_shift = None if lm.means is None else Shift(lm.means, torch.ones(1, dtype=torch.float64))
            parts.append((_key_nr_problem, self.m, "k", nr_shift))
        self.totals = {"k": 0.0, "v": 0.0}
        for problem, m, kind, shift in parts:
            W, R = problem(p, heads)
            Mcat = (W @ R).permute(0, 2, 1, 3).reshape(W.shape[0], W.shape[2], -1)
            gram = _cross(Mcat, Mcat, lm.C, shift)
            self.grams.append(((gram + gram.mH) / 2, m, kind))
            self.totals[kind] += float(torch.diagonal(gram, dim1=-2, dim2=-1).real.sum())
        self.cache: dict[tuple[int, ...], float] = {}

    def __call__(self, group: tuple[int, ...]) -> float:
        key = tuple(sorted(group))
        if key not in self.cache:
            cost = 0.0
            for gram, m, kind in self.grams:
                idx = torch.tensor([h * m + j for h in key for j in range(m)])
                sub = gram[:, idx][:, :, idx]
                ev = torch.linalg.eigvalsh(sub).real.clamp_min(0)
                cost += float((ev.sum(-1) - ev[..., -m:].sum(-1)).sum()) / max(self.totals[kind], 1e-300)
            self.cache[key] = cost
        return self.cache[key]


def _partitions(items: list[int], n: int):
    """Every partition of `items` into groups of n (the group holding the first item comes first)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in combinations(rest, n - 1):
        group = (first, *others)
        remaining = [x for x in rest if x not in others]
        for tail in _partitions(remaining, n):
            yield [group, *tail]


def _partition_count(Hkv: int, groups: int) -> int:
    n = Hkv // groups
    return math.factorial(Hkv) // (math.factorial(n) ** groups * math.factorial(groups))


def similarity_order(att: Attention, groups: int, lm: LayerMath, max_exhaustive: int = 2000) -> list[int]:
    """A KV-head order whose contiguous runs are the groups that lose least when merged (equal sizes).

    Every partition is tried when there are at most `max_exhaustive`; otherwise the best single swaps between two
    groups are made, starting from the contiguous grouping, until none helps."""
    Hkv = att.num_kv_heads
    n = Hkv // groups
    if groups in (1, Hkv):
        return list(range(Hkv))
    cost = GroupCost(att, lm)
    if _partition_count(Hkv, groups) <= max_exhaustive:
        best = min(_partitions(list(range(Hkv)), n), key=lambda part: sum(cost(g) for g in part))
        parts = [list(g) for g in best]
    else:
        parts = [list(range(g * n, (g + 1) * n)) for g in range(groups)]
        for _ in range(4 * Hkv):
            base = [cost(tuple(g)) for g in parts]
            best_delta, best_swap = -1e-12, None
            for a, b in combinations(range(groups), 2):
                for x in parts[a]:
                    for y in parts[b]:
                        ga = tuple(h for h in parts[a] if h != x) + (y,)
                        gb = tuple(h for h in parts[b] if h != y) + (x,)
                        delta = cost(ga) + cost(gb) - base[a] - base[b]
                        if delta < best_delta:
                            best_delta, best_swap = delta, (a, b, x, y)
            if best_swap is None:
                break
            a, b, x, y = best_swap
            parts[a] = [h for h in parts[a] if h != x] + [y]
            parts[b] = [h for h in parts[b] if h != y] + [x]
    parts = sorted((sorted(g) for g in parts), key=lambda g: g[0])
    return [h for g in parts for h in g]
