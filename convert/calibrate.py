"""Calibrated merging (issue #4): closed-form, rotary-exact merging of KV heads, fitted on calibration text, with the
compensating maps folded into q_proj and o_proj. No new parameters; stock transformers loads the result.

For each group of KV heads that become one, with `A` the attention input (post input-norm hidden states) on
calibration text and `C = [A 1]^T [A 1]` its second moment (the 1 carries biases):

values   The shared value projection spans the best head_dim-dimensional subspace of the group's value outputs, in
         the metric of the o_proj columns that read them: PCA of the concatenated values `A W_h^T S_h^(1/2)`, where
         `S_h` sums `O_j^T O_j` over the query heads j of head h. Each original head is then a linear map of the
         shared one (`v_h ~ v' M_h`), and `M_h^T` is folded into the o_proj columns of its query heads. Exact when the
         group's values already lie in one head_dim-dimensional subspace.
keys     Rotary multiplies each pair of key dims (j, j + rotary_dim/2), read as one complex number, by e^(i theta_j t).
         A complex scalar per pair commutes with that rotation; a general linear map does not. So each pair's keys
         are merged as the top complex principal component of the group, each head weighted by the energy of the
         queries that read it, and the conjugate of each head's complex coefficient is folded into its queries'
         q_proj rows. Dims without rotary (partial rotary, alibi) use full linear maps weighted by the query
         covariance. Exact when the group's keys are complex multiples of each other, pair by pair.
slow     Softmax ignores an offset shared by all of a query's logits. A constant key component adds, on pair f, an
pairs    offset turning by theta_f per token; over a context of L tokens only 1 - |mean_t e^(i theta_f t)|^2 of it
         varies. Each pair is fitted with the rest of the input mean removed from its metric, so slow pairs spend
         nothing on key means the attention cannot see (on dims without rotary, the whole mean).
weights  Positions that receive much attention (the first token of a window) weigh more than their count: key and
         value moments are mixed with moments weighted by the attention each position receives (eager attention).
o refit  Then o_proj is re-fitted by ridge regression so that the converted layer's attention output matches the
         original layer's on the calibration text, shrunk towards the folded o_proj (which is already the solution
         when the merge is exact). This absorbs what the key merge changes in the attention pattern.
streams  Each layer is fitted on the hidden states of the *converted* model so far, against the original layer's
         output on those states. The original model's states are carried along too: the o refit also takes back a
         share (`drift`) of the difference of the two residual streams, and q/k/v read inputs mapped a share
         (`input_correction`) of the way back towards the original ones.

Families that normalize queries and keys per head after the projection (q/k norm: qwen3, olmo2, gemma3, ...) do not
commute with the key-side fold: for them the merged key is the query-energy weighted mean of the group's keys and no
fold is made on the key side (approximate); values and the o refit are as above.

The layer runner builds each decoder layer from the checkpoint's own transformers modeling code (on the meta device,
then materialized one layer at a time), so peak memory is about one layer plus the calibration activations.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .families import QK_NORM_FAMILIES, Attention, ConversionError, output_shapes
from .methods import Method, permute_kv_heads, register

GROUPINGS = ("contiguous", "similarity")
CENTERINGS = ("global", "sequence", "none")
STREAMS = ("both", "converted", "original")
BUILTIN = "builtin"  # Python's own pydoc topics text: offline, ships with every Python
RANDOM = "random"  # uniform random token ids: no tokenizer needed (tests, data-free smoke runs)
DEFAULT_TOKENS = 8192
DEFAULT_SEQ_LEN = 512
# Families whose rotary pairs are interleaved (dims 2j, 2j+1) rather than split halves (j, j + rotary_dim/2).
INTERLEAVED_ROTARY = ("cohere", "cohere2", "ernie4_5")
PLOT = "calibration_errors.png"
# Relative error of an attention output that only rounding explains, by calibration dtype: below it the o refit is
# not made (the merge was exact; bf16 runs of two different but equivalent layers differ by about 1%).
NOISE_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 0.03, torch.float16: 0.005}


# ---------------------------------------------------------------------------------------------------------------
# Linear algebra: everything in float64 / complex128, from second moments only.


def _sqrt_psd(S: Tensor) -> Tensor:
    """Square root of Hermitian positive semi-definite matrices [..., m, m]."""
    w, V = torch.linalg.eigh((S + S.mH) / 2)
    return (V * w.clamp_min(0).sqrt().unsqueeze(-2).to(V.dtype)) @ V.mH


@dataclass
class Shift:
    """A low-rank change of the second moment per problem f: C_f = C - beta[f] U U^T."""

    U: Tensor  # [D', r]
    beta: Tensor  # [F]


def _cross(X: Tensor, Y: Tensor, C: Tensor, shift: Shift | None) -> Tensor:
    """X^H C_f Y for X [F, ..., D', a], Y [F, ..., D', b]."""
    out = X.mH @ (C.to(Y.dtype) @ Y)
    if shift is not None:
        U = shift.U.to(Y.dtype)
        beta = shift.beta.reshape(-1, *([1] * (out.dim() - 1))).to(out.dtype)
        out = out - beta * ((X.mH @ U) @ (U.T @ Y))
    return out


@dataclass
class Subspace:
    """A group's shared projection and each head's map from it: A W[f, h] ~ (A P[f]) M[f, h]."""

    P: Tensor  # [F, D', m]
    M: Tensor  # [F, n, m, m]
    lost: Tensor  # [F] weighted energy the shared projection does not capture
    total: Tensor  # [F] weighted energy of the group
    rel_err: Tensor  # [F] unweighted relative error of the reconstructed outputs (norm ratio)
    energy: Tensor  # [F] unweighted energy of the group's outputs


def merge_subspace(
    W: Tensor, C: Tensor, R: Tensor | None = None, shift: Shift | None = None, align: bool = False
) -> Subspace:
    """Best shared rank-m projection for n heads, batched over F independent problems.

    W [F, n, D', m] real or complex: head h outputs A @ W[f, h]. C [D', D']: second moment of A (real, float64),
    changed per problem by `shift` when given. R [F, n, m, m]: square roots of each head's output weighting (None:
    identity). The shared projection P is the top-m weighted principal subspace of the concatenated outputs; each
    head's map M is then the least-squares map from the shared outputs to its own, which equals the PCA's map when
    the fit is exact. `align` picks, within the shared subspace, the basis closest to the mean of the heads, so that
    the maps are as close to the identity as the heads allow (identical heads: exactly the identity).
    """
    F, n, Dp, m = W.shape
    Wr = W if R is None else W @ R
    Mcat = Wr.permute(0, 2, 1, 3).reshape(F, Dp, n * m)
    gram = _cross(Mcat, Mcat, C, shift)
    gram = (gram + gram.mH) / 2
    evals, evecs = torch.linalg.eigh(gram)
    top = evecs[..., -m:].flip(-1)
    P = Mcat @ top  # [F, D', m]
    total = evals.real.clamp_min(0).sum(-1)
    lost = (total - evals[..., -m:].real.clamp_min(0).sum(-1)).clamp_min(0)
    # Give every shared dim the mean energy of the group's original dims (keeps weights at their usual scale).
    WCW = _cross(W, W, C, shift)  # [F, n, m, m]
    energy = torch.diagonal(WCW, dim1=-2, dim2=-1).real.mean((-1, -2))  # [F]
    col = torch.diagonal(_cross(P, P, C, shift), dim1=-2, dim2=-1).real  # [F, m]
    ok = col > 1e-12 * energy.clamp_min(1e-300)[:, None]
    scale = torch.where(ok, (energy[:, None] / col.clamp_min(1e-300)).sqrt(), torch.ones_like(col))
    P = P * scale[:, None, :].to(P.dtype)
    if align:
        target = W.mean(1)  # [F, D', m]
        T = torch.linalg.solve(
            _cross(P, P, C, shift) + 1e-12 * torch.eye(m, dtype=P.dtype) * col.mean(), _cross(P, target, C, shift)
        )
        if bool((torch.linalg.cond(T) < 1e8).all()):
            P = P @ T
    # Least-squares maps from the shared outputs to each head's outputs.
    PCP = _cross(P, P, C, shift)  # [F, m, m]
    ridge = 1e-12 * torch.diagonal(PCP, dim1=-2, dim2=-1).real.mean(-1).clamp_min(1e-300)
    PCP = PCP + ridge[:, None, None] * torch.eye(m, dtype=PCP.dtype)
    rhs = _cross(P[:, None].expand(F, n, Dp, m), W, C, shift)  # [F, n, m, m]
    M = torch.linalg.solve(PCP[:, None], rhs)
    res = W - P[:, None] @ M
    res_e = torch.diagonal(_cross(res, res, C, shift), dim1=-2, dim2=-1).real.sum((-1, -2)).clamp_min(0)
    all_e = torch.diagonal(WCW, dim1=-2, dim2=-1).real.sum((-1, -2))
    rel = (res_e.clamp_min(0) / all_e.clamp_min(1e-300)).sqrt()
    return Subspace(P, M, lost, total, rel, all_e)


def rotary_pairs(model_type: str, rotary_dim: int) -> tuple[Tensor, Tensor]:
    """Indices (re, im) of the dims rotary turns together: halves (j, j + r/2), or interleaved (2j, 2j + 1)."""
    if model_type in INTERLEAVED_ROTARY:
        return torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)
    half = rotary_dim // 2
    return torch.arange(half), torch.arange(half) + half


def _augment(w: Tensor, b: Tensor | None) -> Tensor:
    """[heads, d, D] weight and [heads, d] bias -> [heads, d, D+1] (zeros where there is no bias), float64."""
    w = w.double()
    bias = torch.zeros(w.shape[:-1], dtype=w.dtype) if b is None else b.double()
    return torch.cat([w, bias[..., None]], dim=-1)


@dataclass
class LayerMath:
    """Everything the merge of one layer needs besides the weights."""

    C: Tensor  # [D+1, D+1] float64 second moment of [A 1]
    pairs: tuple[Tensor, Tensor]  # rotary (re, im) dim indices
    qk_norm: bool  # keys are normalized per head after the projection: no key-side fold
    slow: Tensor | None = None  # [F] per rotary pair: the share of a constant key offset the softmax ignores
    means: Tensor | None = None  # [D', r]: means of [A 1] the softmax may ignore, as U with U U^T their moment
    # Second moment and means for a group of KV heads (original indices), weighted by the attention its
    # positions receive; mixed into C with weight key_weighting for keys, value_weighting for values.
    moment: Callable[[list[int]], tuple[Tensor, Tensor | None]] | None = None
    key_weighting: float = 0.0
    value_weighting: float = 0.0
    # [D+1, D+1]: maps the converted model's attention inputs towards the original model's (least squares), applied
    # to q/k/v rows before merging (two-stream calibration only).
    correction: Tensor | None = None

    def group_moment(self, heads: list[int], alpha: float) -> tuple[Tensor, Tensor | None]:
        if self.moment is None or alpha == 0:
            return self.C, self.means
        Cw, mw = self.moment(heads)
        C = (1 - alpha) * self.C + alpha * Cw
        if self.means is None or mw is None:
            return C, None
        return C, torch.cat([(1 - alpha) ** 0.5 * self.means, alpha**0.5 * mw], dim=1)

    def key_shift(self, means: Tensor | None) -> Shift | None:
        """The change of the key-side metric on every rotary pair: the input means the softmax cannot see."""
        return None if self.slow is None or means is None else Shift(means, self.slow)


class _Prepared:
    """Per-KV-head quantities of a layer, computed once (merging and grouping both read them)."""

    def __init__(self, att: Attention, lm: LayerMath):
        self.C = C = lm.C
        H, Hkv, d = att.num_heads, att.num_kv_heads, att.q.shape[1]
        self.r = H // Hkv  # query heads per KV head
        self.re, self.im = lm.pairs
        rot = torch.zeros(d, dtype=torch.bool)
        rot[self.re] = True
        rot[self.im] = True
        self.nr = (~rot).nonzero().flatten()  # dims without rotary
        self.q = _augment(att.q, att.q_bias)  # [H, d, D']
        self.k = _augment(att.k, att.k_bias)
        self.v = _augment(att.v, att.v_bias)
        self.o = att.o.double()  # [D, H, d]
        # Keys, rotary part: one complex row per pair; query energy per pair sums over the KV head's query heads.
        self.kc = torch.complex(self.k[:, self.re], self.k[:, self.im])  # [Hkv, F, D']
        qc = torch.complex(self.q[:, self.re], self.q[:, self.im])  # [H, F, D']
        q_energy = (qc.real @ C * qc.real).sum(-1) + (qc.imag @ C * qc.imag).sum(-1)  # [H, F]
        self.k_weight = q_energy.reshape(Hkv, self.r, -1).sum(1)  # [Hkv, F]
        # Keys without rotary: query covariance of those dims.
        qn = self.q[:, self.nr]  # [H, m, D']
        self.k_nr_weight = (qn @ C @ qn.transpose(-1, -2)).reshape(Hkv, self.r, len(self.nr), len(self.nr)).sum(1)
        # Values: o_proj metric.
        oh = self.o.permute(1, 0, 2)  # [H, D, d]
        self.v_weight = (oh.transpose(-1, -2) @ oh).reshape(Hkv, self.r, d, d).sum(1)  # [Hkv, d, d]


def _key_rot_problem(p: _Prepared, heads: list[int]) -> tuple[Tensor, Tensor]:
    W = p.kc[heads].transpose(0, 1)[..., None]  # [F, n, D', 1]
    R = p.k_weight[heads].T.clamp_min(0).sqrt()[..., None, None].to(W.dtype)  # [F, n, 1, 1]
    return W, R


def _key_nr_problem(p: _Prepared, heads: list[int]) -> tuple[Tensor, Tensor]:
    W = p.k[heads][:, p.nr].transpose(-1, -2)[None]  # [1, n, D', m]
    return W, _sqrt_psd(p.k_nr_weight[heads])[None]


def _value_problem(p: _Prepared, heads: list[int]) -> tuple[Tensor, Tensor]:
    W = p.v[heads].transpose(-1, -2)[None]  # [1, n, D', d]
    return W, _sqrt_psd(p.v_weight[heads])[None]


def merge_layer(att: Attention, groups: int, lm: LayerMath) -> tuple[Attention, dict]:
    """Merge contiguous groups of KV heads (see the module docstring); returns the merged layer and statistics."""
    p = _Prepared(att, lm)
    Hkv, d, D = att.num_kv_heads, att.q.shape[1], att.q.shape[2]
    n = Hkv // groups
    q, o = p.q.clone(), p.o.clone()
    k_new = torch.zeros(groups, d, D + 1, dtype=torch.float64)
    v_new = torch.zeros(groups, d, D + 1, dtype=torch.float64)
    k_norm = None if att.k_norm is None else torch.zeros(groups, d)
    k_lost = k_total = v_lost = v_total = 0.0
    k_err_num = k_err_den = v_err_num = v_err_den = 0.0
    for g in range(groups):
        heads = list(range(g * n, (g + 1) * n))
        qheads = [list(range(h * p.r, (h + 1) * p.r)) for h in heads]
        # Values.
        C, _ = lm.group_moment(heads, lm.value_weighting)
        W, R = _value_problem(p, heads)
        sv = merge_subspace(W, C, R)
        v_new[g] = sv.P[0].T
        for i, js in enumerate(qheads):
            o[:, js] = o[:, js] @ sv.M[0, i].T
        v_lost, v_total = v_lost + float(sv.lost.sum()), v_total + float(sv.total.sum())
        v_err_num += float((sv.rel_err**2 * sv.energy).sum())
        v_err_den += float(sv.energy.sum())
        # Keys.
        C, means = lm.group_moment(heads, lm.key_weighting)
        if lm.qk_norm:
            k_new[g], stats = _weighted_mean_keys(p, heads)
            if k_norm is not None:
                wts = p.k_weight[heads].sum(1, keepdim=True).float()
                k_norm[g] = (att.k_norm[heads] * wts).sum(0) / wts.sum().clamp_min(1e-30)
            k_lost, k_total = k_lost + stats[0], k_total + stats[1]
            k_err_num, k_err_den = k_err_num + stats[2], k_err_den + stats[3]
            continue
        if len(p.re):
            W, R = _key_rot_problem(p, heads)
            sk = merge_subspace(W, C, R, lm.key_shift(means))
            k_new[g, p.re], k_new[g, p.im] = sk.P[:, :, 0].real, sk.P[:, :, 0].imag
            for i, js in enumerate(qheads):
                c = sk.M[:, i, 0, 0].conj()  # [F]: q' = q * conj(c) on every pair
                qc = torch.complex(q[js][:, p.re], q[js][:, p.im]) * c[None, :, None]
                q[js[0] : js[-1] + 1, p.re], q[js[0] : js[-1] + 1, p.im] = qc.real, qc.imag
            k_lost, k_total = k_lost + float(sk.lost.sum()), k_total + float(sk.total.sum())
            k_err_num += float((sk.rel_err**2 * sk.energy).sum())
            k_err_den += float(sk.energy.sum())
        if len(p.nr):
            W, R = _key_nr_problem(p, heads)
            # A constant key offset on dims that do not rotate moves no softmax.
            shift = None if means is None else Shift(means, torch.ones(1, dtype=torch.float64))
            sk = merge_subspace(W, C, R, shift, align=True)
            k_new[g, p.nr] = sk.P[0].T
            for i, js in enumerate(qheads):
                q[js[0] : js[-1] + 1, p.nr] = sk.M[0, i] @ q[js[0] : js[-1] + 1, p.nr]
            k_lost, k_total = k_lost + float(sk.lost.sum()), k_total + float(sk.total.sum())
            k_err_num += float((sk.rel_err**2 * sk.energy).sum())
            k_err_den += float(sk.energy.sum())
    merged = att.replace(
        q=q[..., :D].float(),
        q_bias=None if att.q_bias is None else q[..., D].float(),
        k=k_new[..., :D].float(),
        k_bias=None if att.k_bias is None else k_new[..., D].float(),
        v=v_new[..., :D].float(),
        v_bias=None if att.v_bias is None else v_new[..., D].float(),
        o=o.float(),
        k_norm=k_norm,
    )
    stats = {
        # Relative errors of the reconstructed key / value outputs on the calibration text (norm ratios).
        "k_rel_err": math.sqrt(k_err_num / max(k_err_den, 1e-300)),
        "v_rel_err": math.sqrt(v_err_num / max(v_err_den, 1e-300)),
        # Share of the weighted energy (query-weighted keys, o_proj-weighted values) the merge loses.
        "k_weighted_loss": k_lost / max(k_total, 1e-300),
        "v_weighted_loss": v_lost / max(v_total, 1e-300),
    }
    return merged, stats


def _weighted_mean_keys(p: _Prepared, heads: list[int]) -> tuple[Tensor, tuple[float, float, float, float]]:
    """q/k-norm families: the query-energy weighted mean of the group's keys, dim by dim (no fold possible)."""
    d = p.k.shape[1]
    w = torch.zeros(len(heads), d, dtype=torch.float64)
    w[:, p.re] = p.k_weight[heads]
    w[:, p.im] = p.k_weight[heads]
    if len(p.nr):
        w[:, p.nr] = torch.diagonal(p.k_nr_weight[heads], dim1=-2, dim2=-1)
    w = w.clamp_min(0) + 1e-12 * w.abs().max().clamp_min(1e-300)
    k = p.k[heads]  # [n, d, D']
    merged = (w[..., None] * k).sum(0) / w.sum(0)[:, None]
    res = k - merged[None]
    e_res = (res @ p.C * res).sum(-1)  # [n, d] energy of each head's residual, dim by dim
    e_all = (k @ p.C * k).sum(-1)
    return merged, (float((w * e_res).sum()), float((w * e_all).sum()), float(e_res.sum()), float(e_all.sum()))


# ---------------------------------------------------------------------------------------------------------------
# Grouping: which KV heads share a group.


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


# ---------------------------------------------------------------------------------------------------------------
# Calibration text.


def calibration_ids(
    folder: Path | None, data: str | None, n_tokens: int, seq_len: int, seed: int, vocab_size: int
) -> tuple[Tensor, str]:
    """[B, T] token ids (B*T <= n_tokens, T <= seq_len) and a description of where they came from.

    data: None or "builtin" (Python's pydoc topics text, offline), "random" (uniform random ids, no tokenizer),
    or any source `convert.data` reads: local .txt/.jsonl/.json/.parquet files (path or glob) or a hub dataset.
    """
    if n_tokens < 2:
        raise ConversionError(f"--calibration-tokens must be at least 2, got {n_tokens}")
    T = min(seq_len, n_tokens)
    B = n_tokens // T
    total = B * T
    data = data or BUILTIN
    if data == RANDOM:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (B, T), generator=gen), f"random token ids (seed {seed})"
    tokenizer = _tokenizer(folder)
    if data == BUILTIN:
        ids = tokenizer(builtin_calibration_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
        return _windows(
            ids, B, T, seed, "the builtin calibration text"
        ), f"builtin: pydoc topics, first half (seed {seed})"
    try:
        from .data import DataError, describe_source, sample_token_ids
    except ImportError:  # convert.data not available: plain local text files only
        return _read_text_file(data, tokenizer, B, T, seed), f"{data} (seed {seed})"
    try:
        ids_t = sample_token_ids(data, tokenizer, total, seed)
        where = describe_source(data)
    except DataError as e:
        raise ConversionError(f"--calibration-data {data}: {e}") from None
    return ids_t.reshape(B, T), f"{where} (seed {seed})"


def builtin_calibration_text() -> str:
    """Python's pydoc topic pages, first half by name: the half `gqa-convert eval` does not score."""
    try:
        from .evaluate import builtin_text
    except ImportError:  # older evaluate.py: the same split, done here
        from pydoc_data.topics import topics

        names = sorted(topics)
        return "\n\n".join(topics[n] for n in names[: len(names) // 2])
    return builtin_text("calibration")


def _windows(ids: Tensor, B: int, T: int, seed: int, what: str) -> Tensor:
    """B windows of T tokens, chosen by seed among the non-overlapping windows of `ids`, in text order."""
    slots = len(ids) // T
    if slots < B:
        raise ConversionError(f"{what} has {len(ids)} tokens, fewer than the {B * T} asked for calibration")
    chosen = sorted(random.Random(seed).sample(range(slots), B))
    return torch.stack([ids[s * T : (s + 1) * T] for s in chosen])


def _read_text_file(path: str, tokenizer, B: int, T: int, seed: int) -> Tensor:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConversionError(f"--calibration-data {path}: no such file")
    ids = tokenizer(p.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return _windows(ids, B, T, seed, path)


def _tokenizer(folder: Path | None):
    from transformers import AutoTokenizer

    if folder is None:
        raise ConversionError("calibration text needs the model's tokenizer; use --calibration-data random")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds (missing files, bad json)
        raise ConversionError(
            f"could not load the tokenizer from {folder} ({type(e).__name__}: {e}); calibration text needs it. "
            "Put the tokenizer files beside the weights, or use --calibration-data random"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# One decoder layer at a time, with the checkpoint's own modeling code.


class _Stop(Exception):
    """Raised from a hook once what was wanted is captured: the rest of the layer is not computed."""


class _Probe(torch.nn.Module):
    """Stands in for decoder layers in the model's forward: passes through, or records what the model hands the
    layer (hidden states and keyword arguments: masks, rotary tables, positions) and stops."""

    def __init__(self, like: torch.nn.Module, record: dict | None):
        super().__init__()
        self.record = record
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.record is None:
            return hidden
        self.record.update(hidden=hidden, args=args[1:], kwargs=kwargs)
        raise _Stop


class LayerRunner:
    """Builds a model skeleton on the meta device and materializes one decoder layer at a time from the source."""

    def __init__(self, source: Any, groups: int, dtype: torch.dtype, chunk_tokens: int = 2048, eager: bool = False):
        from .core import patched_config

        self.source, self.dtype, self.chunk_tokens = source, dtype, chunk_tokens
        fam = source.family
        self.layer_prefix = fam.prefix[: fam.prefix.index("{i}")]  # "model.layers."
        inner = fam.prefix[fam.prefix.index("{i}") + 4 :].rstrip(".")  # "self_attn"
        self.attn_path, self.o_path = inner, f"{inner}.{fam.o}"
        self.skeleton = self._skeleton(source.config, "eager" if eager else None)
        self.skeleton_new = self._skeleton(patched_config(source.config, fam, groups))
        self.layer_types = getattr(source.config, "layer_types", None)
        self._kwargs: dict[tuple, dict] = {}

    def _skeleton(self, config: Any, attn_implementation: str | None = None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, **extra)
        model.eval()
        layers = model.get_submodule(self.layer_prefix.rstrip("."))
        inside = {id(m) for m in layers.modules()}
        # Parameter-free modules with buffers (rotary tables) are needed to run a layer: make them real.
        for mod in model.modules():
            if id(mod) in inside or any(True for _ in mod.parameters(recurse=False)):
                continue
            if any(b.is_meta for b in mod.buffers(recurse=False)):
                mod.to_empty(device="cpu", recurse=False)
                model._init_weights(mod)
        return model

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.layer_prefix.rstrip("."))

    def load(self, new: bool, i: int, tensors: dict[str, Tensor]) -> torch.nn.Module:
        """Materialize layer i of a skeleton with `tensors` (names relative to the layer)."""
        model = self.skeleton_new if new else self.skeleton
        layer = self.layers(model)[i]
        if next(layer.parameters()).is_meta:
            layer.to_empty(device="cpu")
            persistent = set(layer.state_dict())
            for name, mod in layer.named_modules():
                if any(f"{name}.{b}".lstrip(".") not in persistent for b, _ in mod.named_buffers(recurse=False)):
                    model._init_weights(mod)  # non-persistent buffers (a per-layer rotary table, say)
        missing, _ = layer.load_state_dict(tensors, strict=False)
        if missing:
            raise ConversionError(f"layer {i}: the checkpoint lacks {missing} that the model class needs")
        return layer

    def unload(self, new: bool, i: int) -> None:
        self.layers(self.skeleton_new if new else self.skeleton)[i].to_empty(device="meta")

    def _record(self, i: int, inputs_embeds: Tensor) -> dict:
        """Run the model's forward up to layer i with probes in place of the layers; returns what layer i gets."""
        layers = self.layers(self.skeleton)
        saved = list(layers)
        record: dict = {}
        try:
            for j in range(i + 1):
                layers[j] = _Probe(saved[j], record if j == i else None)
            self.skeleton(inputs_embeds=inputs_embeds, use_cache=False)
        except _Stop:
            pass
        finally:
            for j in range(i + 1):
                layers[j] = saved[j]
        if "hidden" not in record:
            raise ConversionError(f"could not reach layer {i} of the model's forward to calibrate it")
        return record

    def layer_call(self, i: int, batch: int, seq: int) -> tuple[tuple, dict]:
        """The positional and keyword arguments the model passes to layer i (cached per layer type and shape)."""
        kind = self.layer_types[i] if self.layer_types else None
        first = self.layer_types.index(kind) if self.layer_types else 0
        key = (kind, batch, seq)
        if key not in self._kwargs:
            embeds = torch.zeros(batch, seq, self.source.shapes.hidden, dtype=self.dtype)
            rec = self._record(first, embeds)
            self._kwargs[key] = (rec["args"], rec["kwargs"])
        return self._kwargs[key]

    def embed(self, ids: Tensor) -> list[Tensor]:
        """First-layer inputs for the calibration ids, in chunks, as the model computes them (embedding scale
        and any input normalizer included)."""
        emb = self.skeleton.get_input_embeddings()
        name = next(n for n, m in self.skeleton.named_modules() if m is emb)
        key = f"{name}.weight"
        if key not in self.source.tensors:
            raise ConversionError(f"no {key} in the checkpoint: cannot embed the calibration text")
        emb.to_empty(device="cpu")
        if any(True for _ in emb.buffers()):
            self.skeleton._init_weights(emb)
        emb.load_state_dict({"weight": self.source.get(key)}, strict=False)
        chunks = []
        try:
            for ids_chunk in self.split(ids):
                with torch.no_grad():
                    rec = self._record(0, emb(ids_chunk))
                chunks.append(rec["hidden"].detach())
                self._kwargs.setdefault(
                    (self.layer_types[0] if self.layer_types else None, *ids_chunk.shape), (rec["args"], rec["kwargs"])
                )
        finally:
            emb.to_empty(device="meta")
        return chunks

    def split(self, x: Tensor) -> list[Tensor]:
        rows = max(1, self.chunk_tokens // x.shape[1])
        return list(torch.split(x, rows))

    @torch.no_grad()
    def run(
        self,
        layer: torch.nn.Module,
        i: int,
        xs: list[Tensor],
        *,
        attn_input: bool = False,
        o_io: bool = False,
        stop: str | None = None,
        received: bool = False,
        attention_output: list[Tensor] | None = None,
    ) -> dict[str, Any]:
        """Run a materialized layer on chunks of hidden states. Captures the attention input ("A"), the o_proj
        input and output ("Z", "Y") and the attention each position receives ("W", eager attention only);
        stop="attention" ends each chunk at the attention input, stop="o" after the attention module; otherwise the
        layer outputs come back as "out". `attention_output` (one tensor per chunk) stands in for the attention
        module's output, which is then not computed."""
        attn, o = layer.get_submodule(self.attn_path), layer.get_submodule(self.o_path)
        got: dict[str, list[Tensor]] = {"A": [], "Z": [], "Y": [], "out": [], "W": []}

        def pre_attn(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if attn_input:
                got["A"].append(hidden.reshape(-1, hidden.shape[-1]).float())
            if stop == "attention":
                raise _Stop

        def after_o(_m, args, output):
            if o_io:
                got["Z"].append(args[0].reshape(-1, args[0].shape[-1]).float())
                got["Y"].append(output.reshape(-1, output.shape[-1]).float())

        def after_attn(_m, args, output):
            self._attn_tuple = len(output) if isinstance(output, tuple) else 0
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if received and probs is not None and probs.dim() == 4:  # [b, H, T, T] (eager attention)
                got["W"].append(probs.float().sum(-2).permute(1, 0, 2).reshape(probs.shape[1], -1))
            if stop == "o":  # o_proj runs inside the attention module
                raise _Stop

        handles = [
            attn.register_forward_pre_hook(pre_attn, with_kwargs=True),
            o.register_forward_hook(after_o),
            attn.register_forward_hook(after_attn),
        ]
        if attention_output is not None:
            given = iter(attention_output)
            width = getattr(self, "_attn_tuple", 2)

            def stand_in(*_args: Any, **_kwargs: Any) -> Any:
                out = next(given)
                return (out, *([None] * (width - 1))) if width else out

            attn.forward = stand_in
        try:
            for x in xs:
                args, kwargs = self.layer_call(i, x.shape[0], x.shape[1])
                try:
                    out = layer(x, *args, **kwargs)
                    got["out"].append((out[0] if isinstance(out, tuple) else out).detach())
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            if attention_output is not None:
                del attn.forward
        cat = {"W": 1, "out": None}
        return {
            k: (torch.cat(v, dim=cat.get(k, 0)) if cat.get(k, 0) is not None else v) if v else None
            for k, v in got.items()
        }


def slow_share(inv_freq: Tensor | None, pairs: int, context: int) -> Tensor | None:
    """Softmax ignores a logit offset shared by all keys. A key component that is constant over tokens adds, for
    rotary pair f, an offset that turns by theta_f per token: over a context of L tokens only the share
    1 - |mean_t e^(i theta_f t)|^2 of it varies. Pair f's key merge is fitted with the rest,
    beta_f = |mean_t e^(i theta_f t)|^2, of the input mean removed: slow pairs spend nothing on key means."""
    if inv_freq is None or len(inv_freq) != pairs or pairs == 0:
        return None
    t = torch.arange(max(context, 1), dtype=torch.float64)
    phase = inv_freq.double()[:, None] * t[None]
    return torch.cos(phase).mean(1) ** 2 + torch.sin(phase).mean(1) ** 2


def input_correction(A_new: Tensor, A_orig: Tensor, C: Tensor, beta: float, ridge: float = 1e-3) -> Tensor:
    """M [D+1, D+1] with [A_new 1] M ~ [A_new 1] + beta ([A_orig 1] - [A_new 1]) in least squares."""
    D = A_new.shape[1]
    cross = torch.zeros(D + 1, D + 1, dtype=torch.float64)
    for a, b in zip(torch.split(A_new, 4096), torch.split(A_orig, 4096)):
        ones = torch.ones(a.shape[0], 1)
        cross += (torch.cat([a.float(), ones], 1).T @ torch.cat([b.float(), ones], 1)).double()
    lam = ridge * float(torch.diagonal(C).mean())
    eye = torch.eye(D + 1, dtype=torch.float64)
    return eye + beta * torch.linalg.solve(C + lam * eye, cross - C)


def correct_inputs(att: Attention, M: Tensor) -> Attention:
    """q/k/v rows w -> M w (the projections read corrected inputs); biases appear only where the layer has them."""
    D = att.q.shape[-1]
    out = {}
    for name in ("q", "k", "v"):
        w, b = getattr(att, name), getattr(att, f"{name}_bias")
        if b is None:
            out[name] = (w.double() @ M[:D, :D].T).float()  # no constant input: the D x D block only
        else:
            aug = _augment(w, b) @ M.T
            out[name], out[f"{name}_bias"] = aug[..., :D].float(), aug[..., D].float()
    return att.replace(**out)


def second_moment(A: Tensor) -> Tensor:
    """[N, D] -> [D+1, D+1] float64 second moment of [A 1], accumulated in float32 blocks."""
    D = A.shape[1]
    C = torch.zeros(D + 1, D + 1, dtype=torch.float64)
    for block in torch.split(A, 4096):
        aug = torch.cat([block.float(), torch.ones(block.shape[0], 1)], dim=1)
        C += (aug.T @ aug).double()
    return C


# ---------------------------------------------------------------------------------------------------------------
# The layer-by-layer calibration and the method.


@dataclass
class LayerCalibration:
    """What `Calibrated.merge` gets for one layer: the statistics, and `finish` (re-fit o_proj, move on)."""

    layer: int
    math: LayerMath
    grouping: str
    finish: Callable[[int, Attention], tuple[Attention, dict]]


def refit_o(merged: Attention, Z: Tensor, Y: Tensor, ridge: float, floor: float = 0.0) -> tuple[Attention, dict]:
    """Least-squares o_proj from the converted layer's per-head attention outputs Z [N, H*d] to the target Y [N, D],
    shrunk towards the folded o_proj (ridge `ridge` times the mean diagonal of Z^T Z).

    When the folded o_proj already reproduces Y within `floor` (the noise of the calibration dtype), the merge was
    exact and the folded o_proj is kept: a fit to rounding noise would only move weights off the exact answer."""
    D, H, d = merged.o.shape
    O_fold = merged.o.reshape(D, H * d).double()
    ZtZ = torch.zeros(H * d, H * d, dtype=torch.float64)
    ZtY = torch.zeros(H * d, D, dtype=torch.float64)
    YtY = 0.0
    for z, y in zip(torch.split(Z, 4096), torch.split(Y, 4096)):
        ZtZ += (z.T @ z).double()
        ZtY += (z.T @ y).double()
        YtY += float((y.double() ** 2).sum())
    lam = ridge * float(torch.diagonal(ZtZ).mean().clamp_min(1e-30))
    O = torch.linalg.solve(ZtZ + lam * torch.eye(H * d, dtype=torch.float64), ZtY + lam * O_fold.T).T

    def rel_err(X: Tensor) -> float:
        sq = float((X @ ZtZ * X).sum() - 2 * (X * ZtY.T).sum()) + YtY
        return math.sqrt(max(sq, 0.0) / max(YtY, 1e-300))

    stats = {"attn_rel_err_folded": rel_err(O_fold), "attn_rel_err": rel_err(O)}
    if stats["attn_rel_err_folded"] <= floor:
        stats["attn_rel_err"] = stats["attn_rel_err_folded"]
        return merged, stats
    return merged.replace(o=O.reshape(D, H, d).float()), stats


class Calibrator:
    """Walks the layers in order, keeping calibration activations, one materialized layer at a time.

    Each layer is fitted on the hidden states the *converted* model computes (earlier layers' errors included),
    against what the original layer outputs on those same states. With stream "both" (default) the original
    model's hidden states are carried along too, and the o refit also takes back `drift` times the difference of
    the two residual streams; `input_correction` maps the converted attention inputs that much towards the
    original ones (least squares) before merging. Stream "converted" skips the original stream (cheaper);
    "original" fits every layer on the original model's hidden states instead.
    """

    def __init__(
        self,
        source: Any,
        groups: int,
        seed: int,
        *,
        calibration_data: str | None,
        calibration_tokens: int,
        calibration_seq_len: int,
        grouping: str,
        stream: str,
        refit_o: bool,
        ridge: float,
        calibration_dtype: str,
        drift: float,
        input_correction: float,
        key_centering: str,
        key_weighting: float,
        value_weighting: float,
    ):
        if key_centering not in CENTERINGS:
            raise ConversionError(f"key_centering {key_centering!r}: choose one of {', '.join(CENTERINGS)}")
        self.src, self.groups = source, groups
        self.grouping, self.stream, self.refit, self.ridge = grouping, stream, refit_o, ridge
        self.drift = float(drift) if stream == "both" else 0.0
        self.input_correction = float(input_correction) if stream == "both" else 0.0
        self.centering = key_centering
        self.weighting = (float(key_weighting), float(value_weighting))
        self.s_out = output_shapes(source.shapes, groups, source.raw_config, source.family)
        self.present = set(source.tensors)
        self.dtype = getattr(torch, calibration_dtype)
        self.model_type = source.raw_config.get("model_type")
        self.pairs = rotary_pairs(self.model_type, source.shapes.rotary_dim)
        vocab = int(getattr(source.config, "vocab_size", 0) or 0)
        ids, where = calibration_ids(
            getattr(source, "folder", None), calibration_data, calibration_tokens, calibration_seq_len, seed, vocab
        )
        self.seq_len = int(ids.shape[1])
        self.context = max(1, self.seq_len // 2)  # mean causal context of a calibration sequence
        # Eager attention hands back its probabilities: needed for the attention-weighted moments.
        self.runner = LayerRunner(source, groups, self.dtype, eager=max(self.weighting) > 0)
        self.inv_freq = None
        if key_centering != "none":
            self.inv_freq = next(
                (b for n, b in self.runner.skeleton.named_buffers() if n.endswith("inv_freq") and not b.is_meta), None
            )
        x0 = self.runner.embed(ids)
        self.x_orig = x0 if stream in ("original", "both") else None
        self.x_new = x0 if stream in ("converted", "both") else None
        self.pending: dict[str, Any] = {}
        self.summary = {
            "calibration_data": where,
            "calibration_tokens": int(ids.numel()),
            "calibration_sequences": int(ids.shape[0]),
            "calibration_seq_len": self.seq_len,
            "calibration_dtype": calibration_dtype,
            "grouping": grouping,
            "stream": stream,
            "drift": self.drift,
            "input_correction": self.input_correction,
            "refit_o": refit_o,
            "ridge": ridge,
            "key_centering": key_centering,
            "key_weighting": key_weighting,
            "value_weighting": value_weighting,
        }

    def _tensors(self, i: int) -> dict[str, Tensor]:
        p = f"{self.runner.layer_prefix}{i}."
        return {k[len(p) :]: self.src.get(k) for k in self.src.tensors if k.startswith(p)}

    def _qk_norm(self, i: int) -> bool:
        fam = self.src.family
        p = fam.prefix.format(i=i)
        keys = fam.attention_keys(i, self.present)
        return self.model_type in QK_NORM_FAMILIES or any(
            k in keys for k in (f"{p}{fam.q_norm}.weight", f"{p}{fam.k_norm}.weight")
        )

    def __call__(self, i: int) -> dict:
        """Statistics of layer i (the original layer runs here); `finish` then merges on and moves the streams."""
        tensors = self._tensors(i)
        run, layer = self.runner.run, self.runner.load(False, i, tensors)
        recv, nxt, A_orig = max(self.weighting) > 0, None, None
        if self.stream == "original":
            r = run(layer, i, self.x_orig, attn_input=True, o_io=True, received=recv)
            nxt = r["out"]
        else:
            if self.stream == "both":
                r0 = run(layer, i, self.x_orig, attn_input=self.input_correction > 0)
                nxt, A_orig = r0["out"], r0["A"]
            r = run(layer, i, self.x_new, attn_input=True, o_io=True, stop="o", received=recv)
        self.runner.unload(False, i)
        A, Y = r["A"], r["Y"]
        floor = NOISE_FLOOR[self.dtype]
        # Streams that agree within rounding (exact merges so far) need no correction, and get none.
        if self.drift and self._apart(self.x_orig, self.x_new) > floor:
            diff = torch.cat([(a - b).reshape(-1, a.shape[-1]) for a, b in zip(self.x_orig, self.x_new)])
            Y = Y + self.drift * diff.float()
        bias = tensors.get(f"{self.runner.o_path}.bias")
        if bias is not None:
            Y = Y - bias.float()
        self.pending = {"layer": i, "Y": Y, "next_orig": nxt, "tensors": tensors}
        C = second_moment(A)
        moment = self._moment(A, r["W"]) if recv and r.get("W") is not None else None
        correction = None
        if A_orig is not None and self._apart([A_orig], [A]) > floor:
            correction = input_correction(A, A_orig, C, self.input_correction)
        lm = LayerMath(
            C,
            self.pairs,
            self._qk_norm(i),
            slow_share(self.inv_freq, len(self.pairs[0]), self.context),
            self._means(A, torch.ones(A.shape[0])),
            moment,
            *self.weighting,
            correction,
        )
        return {"calibration": LayerCalibration(i, lm, self.grouping, self.finish)}

    @staticmethod
    def _apart(xs: list[Tensor], ys: list[Tensor]) -> float:
        """Relative distance of two chunked streams."""
        num = sum(float((x.float() - y.float()).pow(2).sum()) for x, y in zip(xs, ys))
        den = sum(float(x.float().pow(2).sum()) for x in xs)
        return math.sqrt(num / max(den, 1e-300))

    def _means(self, A: Tensor, w: Tensor) -> Tensor | None:
        """U [D+1, r] with U U^T the (w-weighted) moment of the means the softmax may ignore: the global mean of
        [A 1], or the mean of each calibration sequence."""
        if self.centering == "none":
            return None
        T = A.shape[0] if self.centering == "global" else self.seq_len
        aug = torch.cat([A.double(), torch.ones(A.shape[0], 1, dtype=torch.float64)], dim=1).reshape(
            -1, T, A.shape[1] + 1
        )
        ws = w.double().reshape(-1, T)
        tot = ws.sum(1).clamp_min(1e-300)  # [r]
        mean = (aug * ws[..., None]).sum(1) / tot[:, None]  # [r, D+1]
        return (mean * tot.sqrt()[:, None]).T

    def _moment(self, A: Tensor, W: Tensor) -> Callable[[list[int]], tuple[Tensor, Tensor | None]]:
        """Second moments weighted by the attention each position receives from a group's query heads: keys and
        values of the positions attention reads most (the first token of a sequence, typically) count for what
        they weigh in the attention output."""
        Hkv = self.src.shapes.num_kv_heads
        w_kv = W.reshape(Hkv, W.shape[0] // Hkv, -1).mean(1)  # [Hkv, N], mean 1 per position
        cache: dict[tuple[int, ...], tuple[Tensor, Tensor | None]] = {}

        def moment(heads: list[int]) -> tuple[Tensor, Tensor | None]:
            key = tuple(sorted(heads))
            if key not in cache:
                w = w_kv[list(key)].mean(0)
                Cw = torch.zeros(A.shape[1] + 1, A.shape[1] + 1, dtype=torch.float64)
                for block, wb in zip(torch.split(A, 4096), torch.split(w, 4096)):
                    aug = torch.cat([block.float(), torch.ones(block.shape[0], 1)], dim=1)
                    Cw += ((aug * wb[:, None]).T @ aug).double()
                cache[key] = (Cw, self._means(A, w))
            return cache[key]

        return moment

    def _load_new(self, i: int, att: Attention) -> torch.nn.Module:
        fam = self.src.family
        p = fam.prefix.format(i=i)
        keys = fam.attention_keys(i, self.present)
        start = len(self.runner.layer_prefix) + len(str(i)) + 1
        tensors = dict(self.pending["tensors"])
        for key, t in fam.join(i, att, keys, self.s_out).items():
            tensors[key[start:]] = t
        del p
        return self.runner.load(True, i, tensors)

    def finish(self, i: int, merged: Attention) -> tuple[Attention, dict]:
        if self.pending.get("layer") != i:
            raise RuntimeError(f"calibration context of layer {i} was not prepared (layers must come in order)")
        stats: dict = {}
        layer = self._load_new(i, merged)
        x_in = self.x_orig if self.stream == "original" else self.x_new
        given = None
        if self.refit:
            Z = self.runner.run(layer, i, x_in, o_io=True, stop="o")["Z"]
            merged, stats = refit_o(merged, Z, self.pending["Y"], self.ridge, NOISE_FLOOR[self.dtype])
            if self.stream != "original":  # the attention output with the new o_proj, without recomputing it
                D, H, d = merged.o.shape
                bias = self.pending["tensors"].get(f"{self.runner.o_path}.bias")
                y = Z @ merged.o.reshape(D, H * d).T + (0 if bias is None else bias.float())
                sizes = [x.shape[0] * x.shape[1] for x in self.x_new]
                given = [c.reshape(x.shape).to(x.dtype) for c, x in zip(torch.split(y, sizes), self.x_new)]
            else:
                layer = self._load_new(i, merged)
        if self.stream != "original":
            self.x_new = self.runner.run(layer, i, self.x_new, attention_output=given)["out"]
        self.runner.unload(True, i)
        if self.stream != "converted":
            self.x_orig = self.pending["next_orig"]
        self.pending = {}
        return merged, stats


OPTIONS: dict[str, Any] = {
    "calibration_data": None,  # builtin text
    "calibration_tokens": DEFAULT_TOKENS,
    "calibration_seq_len": DEFAULT_SEQ_LEN,
    "grouping": "contiguous",
    "stream": "both",
    "drift": 0.2,
    "input_correction": 0.3,
    "refit_o": True,
    "ridge": 0.04,
    "calibration_dtype": "bfloat16",
    "key_centering": "global",
    "key_weighting": 0.5,
    "value_weighting": 0.5,
}


@register
class Calibrated(Method):
    """Closed-form merge fitted on calibration text, rotary-exact on keys, compensation folded into q_proj/o_proj."""

    name = "calibrated"
    summary = "calibrated PCA merge: rotary-exact complex key merge folded into q_proj, values folded into o_proj"
    needs_calibration = True

    def __init__(self) -> None:
        self.calibrator: Calibrator | None = None
        self.info: dict = {}

    def options(self, **options: Any) -> dict:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConversionError(f"method 'calibrated' has no option(s) {unknown}; it knows {sorted(OPTIONS)}")
        opts = {**OPTIONS, **{k: v for k, v in options.items() if v is not None}}
        if opts["grouping"] not in GROUPINGS:
            raise ConversionError(f"--grouping {opts['grouping']!r}: choose one of {', '.join(GROUPINGS)}")
        if opts["stream"] not in STREAMS:
            raise ConversionError(f"stream {opts['stream']!r}: choose one of {', '.join(STREAMS)}")
        if opts["calibration_dtype"] not in ("float32", "bfloat16", "float16"):
            raise ConversionError(f"calibration_dtype {opts['calibration_dtype']!r}: float32, bfloat16 or float16")
        opts["calibration_tokens"] = int(opts["calibration_tokens"])
        return opts

    def layer_contexts(self, source: Any, groups: int, seed: int, **options: Any) -> Callable[[int], dict] | None:
        opts = self.options(**options)
        if source.raw_config.get("model_type") == "gpt_bigcode":  # also the output of the gpt2 and opt routes
            raise ConversionError(
                "--method calibrated does not support gpt_bigcode (its learned positions are added outside the "
                "decoder layers that calibration runs): use --method mean, first or random"
            )
        self.calibrator, self.info = None, {"started": time.perf_counter()}
        if groups == source.shapes.num_kv_heads:
            self.info["summary"] = {"note": "G equals the current KV-head count: nothing to merge, weights unchanged"}
            return None
        self.calibrator = Calibrator(source, groups, seed, **opts)
        return self.calibrator

    def merge(
        self,
        att: Attention,
        groups: int,
        *,
        layer: int,
        seed: int,
        calibration: LayerCalibration | None = None,
        **context: Any,
    ) -> tuple[Attention, dict]:
        if groups == att.num_kv_heads:
            return att, {"k_rel_err": 0.0, "v_rel_err": 0.0}
        if calibration is None:
            raise ConversionError(
                "method 'calibrated' needs calibration statistics: run it through convert_checkpoint "
                "(gqa-convert convert --method calibrated), which calibrates layer by layer"
            )
        order = list(range(att.num_kv_heads))
        lm = calibration.math
        if calibration.grouping == "similarity":
            order = similarity_order(att, groups, lm)
            if order != sorted(order):
                att = permute_kv_heads(att, order)
                if lm.moment is not None:
                    lm = replace(lm, moment=lambda heads, f=lm.moment: f([order[h] for h in heads]))
        if lm.correction is not None:
            att = correct_inputs(att, lm.correction)
        merged, stats = merge_layer(att, groups, lm)
        merged, more = calibration.finish(layer, merged)
        stats.update(more)
        stats["kv_order"] = order
        stats["key_merge"] = "weighted mean (q/k norm)" if calibration.math.qk_norm else "complex fold"
        return merged, stats

    def finish(self, folder: Path, report: Any) -> None:
        summary = dict(self.calibrator.summary) if self.calibrator else dict(self.info.get("summary", {}))
        summary["time_s"] = round(time.perf_counter() - self.info.get("started", time.perf_counter()), 2)
        rows = [r for r in report.per_layer if "k_rel_err" in r]
        qk = any(r.get("key_merge", "").startswith("weighted") for r in rows)
        summary["key_merge"] = (
            "approximate: this family normalizes q/k per head after the projection, which no fold commutes with; "
            "merged keys are the query-energy weighted mean of each group's keys"
            if qk
            else "rotary-exact: complex principal component per rotary pair, conjugate folded into q_proj"
        )
        if rows:
            summary["plot"] = PLOT
            plot_errors(
                rows,
                folder / PLOT,
                title=f"{report.source}: {report.kv_heads_before} -> {report.kv_heads_after} KV heads, calibrated",
            )
        path = folder / "gqa_convert.json"
        if path.is_file():
            prov = json.loads(path.read_text())
            prov["calibration"] = summary
            path.write_text(json.dumps(prov, indent=2) + "\n")
        self.calibrator = None  # drop the activations
        self.info["summary"] = summary


def plot_errors(rows: list[dict], path: Path, title: str = "") -> None:
    """PNG of the per-layer reconstruction errors (keys, values, attention output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["layer"])
    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    series = [
        ("k_rel_err", "keys"),
        ("v_rel_err", "values"),
        ("attn_rel_err_folded", "attention out (folded o)"),
        ("attn_rel_err", "attention out (o re-fitted)"),
    ]
    for key, label in series:
        if all(key in r for r in rows):
            ax.plot(x, [r[key] for r in rows], marker="o", ms=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error on calibration text")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
