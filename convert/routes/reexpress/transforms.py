"""Pure tensor transforms the route tables name. Each takes the sizes `z` first, then float32 source tensors
(None where an optional source is absent), and returns the target tensor in float32.

Rows of a projection weight are output features: [out, in]. Biases are [out].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def _rows(x: Tensor, *lead: int) -> Tensor:
    """Weight [R, D] or bias [R] as [*lead, R / prod(lead), cols] (a bias gets one column)."""
    return (x if x.dim() == 2 else x[:, None]).reshape(*lead, -1, x.shape[1] if x.dim() == 2 else 1)


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """Back to a weight [R, cols] or, when `ref` is a bias, a flat [R]."""
    return x.reshape(-1, ref.shape[1]) if ref.dim() == 2 else x.reshape(-1)


def zeros(n: str, z: Any, *_: Any) -> Tensor:
    import torch

    return torch.zeros(getattr(z, n))


def ones(n: str, z: Any, *_: Any) -> Tensor:
    import torch

    return torch.ones(getattr(z, n))


def or_zeros(n: str, z: Any, x: Tensor | None) -> Tensor:
    """An optional bias: itself, or zeros of size z.<n> where the source has none."""
    return x if x is not None else zeros(n, z)


def or_ones(n: str, z: Any, x: Tensor | None) -> Tensor:
    """An optional LayerNorm weight: itself, or ones where the LayerNorm has no affine weight."""
    return x if x is not None else ones(n, z)


# GPT-NeoX's query_key_value rows are [H, 3, d]: each head's q, k and v in turn.
def neox_part(part: int, z: Any, fused: Tensor) -> Tensor:
    """q (0), k (1) or v (2) rows of a fused weight [3*H*d, D] or bias [3*H*d] -> [H*d, D] / [H*d]."""
    return _like(_rows(fused, z.H, 3)[:, part], fused)


def fold_weight(w: Tensor, gamma: Tensor | None) -> Tensor:
    """A linear layer reading LayerNorm(x) = gamma * x_hat + beta: W @ diag(gamma) reads x_hat."""
    return w if gamma is None else w * gamma[None, :]


def fold_bias(b: Tensor | None, w: Tensor, beta: Tensor | None) -> Tensor:
    """... and its bias b + W @ beta (b = 0 where the layer has none)."""
    import torch

    out = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return out if beta is None else out + w @ beta


def neox_q_folded(part: int, z: Any, fused: Tensor, gamma: Tensor) -> Tensor:
    return fold_weight(neox_part(part, z, fused), gamma)


def neox_b_folded(part: int, z: Any, fused_b: Tensor | None, fused: Tensor, beta: Tensor) -> Tensor:
    b = None if fused_b is None else neox_part(part, z, fused_b)
    return fold_bias(b, neox_part(part, z, fused), beta)


def linear_folded(z: Any, w: Tensor, gamma: Tensor) -> Tensor:
    return fold_weight(w, gamma)


def bias_folded(z: Any, b: Tensor | None, w: Tensor, beta: Tensor) -> Tensor:
    return fold_bias(b, w, beta)


def minus_one(z: Any, gamma: Tensor) -> Tensor:
    """nemotron's LayerNorm1P multiplies by (weight + 1): it stores gamma - 1."""
    return gamma - 1


def rotary_half_split(z: Any, w: Tensor) -> Tensor:
    """GPT-J rotates interleaved pairs (2j, 2j+1) of the first rotary_dim dims of each head; phi (like NeoX and
    llama) rotates (j, j + rotary_dim/2) with the same frequency j. Permuting each q/k head's rotary rows to
    [even rows, odd rows] turns one into the other; q.k is unchanged because q and k move alike."""
    import torch

    r = z.rotary_dim
    order = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, z.d)])
    heads = w.reshape(z.H, z.d, -1)
    return heads[:, order].reshape(w.shape)


def transpose(z: Any, w: Tensor) -> Tensor:
    """GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in]."""
    return w.t()


def interleave_qkv(z: Any, fused: Tensor) -> Tensor:
    """[q heads | k heads | v heads] rows -> gpt_bigcode's per-head [H, 3, d] rows (weight [3*H*d, D] or bias)."""
    return _like(_rows(fused, 3, z.H).transpose(0, 1), fused)


def conv1d_qkv(z: Any, w: Tensor) -> Tensor:
    """GPT-2's c_attn Conv1D [D, 3*H*d] -> gpt_bigcode's per-head [H, 3, d] rows [3*H*d, D]."""
    return interleave_qkv(z, w.t())


def stack_qkv(z: Any, q: Tensor | None, k: Tensor | None, v: Tensor | None) -> Tensor:
    """Separate q, k, v (weights [H*d, D] or biases [H*d]; absent biases are zeros) -> per-head [H, 3, d] rows."""
    import torch

    ref = next(x for x in (q, k, v) if x is not None) if any(x is not None for x in (q, k, v)) else None
    if ref is None:
        return torch.zeros(3 * z.H * z.d)
    parts = [_rows(x if x is not None else torch.zeros_like(ref), z.H) for x in (q, k, v)]
    return _like(torch.stack(parts, dim=1), ref)


def drop_rows(n: int, z: Any, w: Tensor) -> Tensor:
    """OPT's learned positions start at row 2 (an offset kept from fairseq); position p reads row p + 2."""
    return w[n:]
