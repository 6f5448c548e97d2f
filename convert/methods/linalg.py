"""The linear algebra of calibrated merging: closed-form, rotary-exact merging of KV heads, fitted on calibration
text, with the compensating maps folded into q_proj and o_proj. No new parameters; stock transformers loads the result.

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

Pure functions on tensors; everything in float64 / complex128, from second moments only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from convert.families import Attention


def _sqrt_psd(S: Tensor) -> Tensor:
    """Square root of Hermitian positive semi-definite matrices [..., m, m]."""
    w, V = torch.linalg.eigh((S + S.mH) / 2)
    return (V * w.clamp_min(0).sqrt().unsqueeze(-2).to(V.dtype)) @ V.mH


@dataclass
class Shift:
    """A low-rank change of the second moment per problem f: C_f = C - beta[f] U U^T."""

    U: Tensor  # [D', r]
    beta: Tensor  # [F]


def _left(C: Tensor, Y: Tensor) -> Tensor:
    """C [D', D'] (real) times Y [..., D', b] (real or complex), as one matrix product: a broadcast product would
    read C once per batch entry, and a complex C would double the work of a real one."""
    *batch, Dp, b = Y.shape
    cols = Y.movedim(-2, 0).reshape(Dp, -1)  # [D', batch * b]
    out = torch.complex(C @ cols.real, C @ cols.imag) if cols.is_complex() else C @ cols
    return out.reshape(Dp, *batch, b).movedim(0, -2)


def _cross(X: Tensor, Y: Tensor, C: Tensor, shift: Shift | None) -> Tensor:
    """X^H C_f Y for X [F, ..., D', a], Y [F, ..., D', b]."""
    out = X.mH @ _left(C, Y)
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


def rotary_pairs(rotary_dim: int, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Indices (re, im) [rotary_dim/2] of the dims rotary turns together: halves (j, j + r/2), or interleaved
    pairs (2j, 2j + 1)."""
    if interleaved:
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
    # [D+1, D+1]: second moment of [K 1] when keys and values read another input K than the queries (T5's
    # cross-attention reads the encoder's output): keys and values are fitted in it, the queries weigh them in C.
    # `means` and `moment` are then K's.
    C_kv: Tensor | None = None

    def group_moment(self, heads: list[int], alpha: float) -> tuple[Tensor, Tensor | None]:
        base = self.C if self.C_kv is None else self.C_kv
        if self.moment is None or alpha == 0:
            return base, self.means
        Cw, mw = self.moment(heads)
        C = (1 - alpha) * base + alpha * Cw
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
    cross = torch.zeros(D + 1, D + 1, dtype=torch.float64, device=A_new.device)
    for a, b in zip(torch.split(A_new.float(), 4096), torch.split(A_orig.float(), 4096)):
        cross[:D, :D] += (a.T @ b).double()  # [A_new 1]^T [A_orig 1], without building either
        cross[:D, D] += a.sum(0).double()
        cross[D, :D] += b.sum(0).double()
        cross[D, D] += float(a.shape[0])
    cross = cross.cpu()
    lam = ridge * float(torch.diagonal(C).mean())
    eye = torch.eye(D + 1, dtype=torch.float64)
    return eye + beta * torch.linalg.solve(C + lam * eye, cross - C)


def correct_inputs(att: Attention, M: Tensor, names: tuple[str, ...] = ("q", "k", "v")) -> Attention:
    """Rows w of the projections `names` -> M w (they read corrected inputs); biases appear only where the layer
    has them. Cross-attention corrects only q (its keys and values read the encoder's output)."""
    D = att.q.shape[-1]
    out = {}
    for name in names:
        w, b = getattr(att, name), getattr(att, f"{name}_bias")
        if b is None:
            out[name] = (w.double() @ M[:D, :D].T).float()  # no constant input: the D x D block only
        else:
            aug = _augment(w, b) @ M.T
            out[name], out[f"{name}_bias"] = aug[..., :D].float(), aug[..., D].float()
    return att.replace(**out)


def second_moment(A: Tensor, w: Tensor | None = None) -> Tensor:
    """[N, D] (any device) -> [D+1, D+1] float64 (CPU) second moment of [A 1], each row weighted by w [N] when
    given; accumulated in float32 blocks on A's device, without building [A 1]."""
    D = A.shape[1]
    C = torch.zeros(D + 1, D + 1, dtype=torch.float64, device=A.device)
    rows = torch.split(w, 4096) if w is not None else [None] * math.ceil(A.shape[0] / 4096)
    for block, wb in zip(torch.split(A, 4096), rows):
        a = block.float()
        aw = a if wb is None else a * wb[:, None].float()
        C[:D, :D] += (aw.T @ a).double()
        sums = aw.double().sum(0)  # float64, like the means subtracted from this moment
        C[:D, D] += sums
        C[D, :D] += sums
        C[D, D] += float(a.shape[0]) if wb is None else float(wb.double().sum())
    return C.cpu()


def refit_o(merged: Attention, Z: Tensor, Y: Tensor, ridge: float, floor: float = 0.0) -> tuple[Attention, dict]:
    """Least-squares o_proj from the converted layer's per-head attention outputs Z [N, H*d] to the target Y [N, D]
    (any device; the solve runs in float64 on the CPU),
    shrunk towards the folded o_proj (ridge `ridge` times the mean diagonal of Z^T Z).

    When the folded o_proj already reproduces Y within `floor` (the noise of the calibration dtype), the merge was
    exact and the folded o_proj is kept: a fit to rounding noise would only move weights off the exact answer."""
    D, H, d = merged.o.shape
    O_fold = merged.o.reshape(D, H * d).double()
    ZtZ = torch.zeros(H * d, H * d, dtype=torch.float64, device=Z.device)
    ZtY = torch.zeros(H * d, D, dtype=torch.float64, device=Z.device)
    YtY = 0.0
    for z, y in zip(torch.split(Z, 4096), torch.split(Y, 4096)):
        ZtZ += (z.T @ z).double()
        ZtY += (z.T @ y).double()
        YtY += float((y.double() ** 2).sum())
    ZtZ, ZtY = ZtZ.cpu(), ZtY.cpu()
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
