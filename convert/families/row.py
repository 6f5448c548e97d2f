"""The `Family` row class, the canonical per-head form of one layer's attention, and the fused weight layouts.

Layouts (rows of a projection weight, `d` = head_dim):
    split     q_proj [H*d, D], k_proj [Hkv*d, D], v_proj [Hkv*d, D]            (llama, qwen2, gemma, ...)
    concat    qkv_proj [(H + 2*Hkv)*d, D] = [q heads | k heads | v heads]       (phi3)
    falcon    query_key_value, three historical arrangements (see `_falcon_*`)  (falcon)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are touched: the table and the planning work without it
    from torch import Tensor

Getter = Callable[[str], "Tensor"]


@dataclass
class Attention:
    """One layer's attention weights, per head, in float32.

    q: [H, d, D]     q_bias: [H, d]      rows of the query projection, head by head
    k: [Hkv, d, D]   k_bias: [Hkv, d]
    v: [Hkv, d, D]   v_bias: [Hkv, d]
    o: [D, H, d]                          columns of the output projection, head by head
    q_norm, k_norm: [H, d] / [Hkv, d]     only for norms that carry a weight per head (olmo2, cohere);
                                          norms shared by all heads ([d]) are not touched and stay out
    """

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    norms_2d: bool = False  # per-head norm weights are stored [heads, d] (cohere), not flat [heads*d] (olmo2)

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[0]

    def replace(self, **changes: Any) -> "Attention":
        return replace(self, **changes)


@dataclass(frozen=True)
class Shapes:
    """Sizes read from a config, never guessed from names."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    num_layers: int
    rotary_dim: int  # leading dims of each head that rotary touches (0: no rotary, e.g. alibi)


# What a family's q/k norm does, by the shape of its weight (d = head_dim):
QK_NORM_KINDS = {
    "": "no q/k norm",
    "shared": "one [d] weight, applied to every head after the projection",
    "flat": "one [H*d] weight over the whole projection",
    "per_head": "one [d] weight per head, stored [H, d]",
}
# Which dims of a head rotary turns together.
ROTARY_LAYOUTS = {
    "half": "dims j and j + r/2 (transformers' rotate_half)",
    "interleaved": "dims 2j and 2j + 1",
    "": "none: positions are learned embeddings (gpt_bigcode), no head dims rotate",
}


@dataclass(frozen=True)
class Family:
    """Everything the converter knows about one group of `model_type`s: where the attention weights are, how they
    are laid out, and how its config.json states (or omits) the sizes."""

    model_types: tuple[str, ...]
    prefix: str = "model.layers.{i}.self_attn."
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    fused: str | None = None  # name of the fused q/k/v projection, for the concat and falcon layouts
    layout: str = "split"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    qk_norm: str = ""  # a key of QK_NORM_KINDS: pooled keys pass through this norm, so the merge is approximate
    rotary: str = "half"  # a key of ROTARY_LAYOUTS
    rope_by_layer_type: bool = False  # rope_parameters per layer type: the full-attention entry sets the rotary width
    kv_key: str = "num_key_value_heads"
    # What transformers' config class assumes when config.json omits a key (head_dim, the KV-head count,
    # partial_rotary_factor, falcon's flags). Absent here: derived as transformers does (head_dim = hidden / heads,
    # KV heads = heads, rotary factor 1). tests/families/test_configs.py checks every row against the config classes.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Older spellings config.json may use for a key, tried after the key itself: key -> (alias, ...).
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: str = ""
    # Tensor-name fragments that mean "this checkpoint uses a variant we cannot express": fragment -> reason.
    refuse: Mapping[str, str] = field(default_factory=dict)
    # Family-specific reading of the current KV-head count and patching of the raw config.json.
    kv_heads: Callable[[Any], int] | None = None
    patch: Callable[[dict, int], dict] | None = None
    # Families that do not follow the common config keys read their sizes themselves (T5: d_kv, decoder layers).
    read_shapes: Callable[[Any], Shapes] | None = None
    # Extra report lines on the KV cache: (shapes, KV heads before, after, bytes per element) -> notes.
    cache_notes: Callable[[Any, int, int, int], list[str]] | None = None
    # Families that do not follow the common config keys read their sizes themselves (T5: d_kv, decoder layers).
    read_shapes: Callable[[Any], "Shapes"] | None = None
    # Extra report lines on the KV cache: (shapes, KV heads before, after, bytes per element) -> notes.
    cache_notes: Callable[[Any, int, int, int], list[str]] | None = None

    def current_kv_heads(self, config: Any) -> int:
        if self.kv_heads is not None:
            return self.kv_heads(config)
        value = getattr(config, self.kv_key, None)
        return int(value) if value else int(config.num_attention_heads)

    def patch_config(self, raw: dict, groups: int) -> dict:
        """A copy of config.json with only what G changes."""
        if self.patch is not None:
            return self.patch(dict(raw), groups)
        return {**raw, self.kv_key: groups}

    def attention_keys(self, layer: int, present: set[str]) -> list[str]:
        """The checkpoint tensors that make up one layer's attention (those that exist in this checkpoint)."""
        p = self.prefix.format(i=layer)
        names = [self.fused] if self.layout != "split" else [self.q, self.k, self.v]
        wanted = [f"{p}{n}.{kind}" for n in names for kind in ("weight", "bias")]
        wanted += [f"{p}{self.o}.weight", f"{p}{self.q_norm}.weight", f"{p}{self.k_norm}.weight"]
        return [k for k in wanted if k in present]

    def planned_shapes(
        self, layer: int, shapes: Mapping[str, tuple[int, ...]], s_in: Shapes, s_out: Shapes
    ) -> dict[str, tuple[int, ...]]:
        """The shapes `join` will give one layer's attention tensors, from their sizes alone (no tensor, no torch):
        output shards are planned, and untouched tensors start copying, before anything is merged.

        Only KV-sized rows change: k/v rows Hkv*d -> G*d, fused rows (H + 2*Hkv)*d -> (H + 2*G)*d, per-head k norms
        Hkv -> G heads. Norms shared by all heads are left out: `join` does not produce them, they pass through.
        """
        p = self.prefix.format(i=layer)
        H, Hkv, G, d = s_in.num_heads, s_in.num_kv_heads, s_out.num_kv_heads, s_in.head_dim
        out: dict[str, tuple[int, ...]] = {}
        for key, shape in shapes.items():
            name = key[len(p) :].rsplit(".", 1)[0]
            if name in (self.q_norm, self.k_norm):
                heads = H if name == self.q_norm else Hkv
                if math.prod(shape) != heads * d or heads == 1:
                    continue  # one weight shared by all heads
                if name == self.k_norm:
                    shape = (G, d) if len(shape) == 2 else (G * d,)
            elif name in (self.k, self.v) and self.layout == "split":
                shape = (G * d, *shape[1:])
            elif name == self.fused:
                shape = ((H + 2 * G) * d, *shape[1:])
            out[key] = tuple(shape)
        return out

    def split(self, layer: int, get: Getter, keys: list[str], s: Shapes) -> Attention:
        """Checkpoint tensors of one layer -> canonical per-head float32 form."""
        p = self.prefix.format(i=layer)
        t = {k[len(p) :]: get(k).float() for k in keys}
        H, Hkv, d, D = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden
        if self.layout == "split":
            q, k, v = t[f"{self.q}.weight"], t[f"{self.k}.weight"], t[f"{self.v}.weight"]
            qb, kb, vb = (t.get(f"{n}.bias") for n in (self.q, self.k, self.v))
        else:
            w = t[f"{self.fused}.weight"]
            b = t.get(f"{self.fused}.bias")
            q, k, v = _LAYOUTS[self.layout][0](w, s)
            qb, kb, vb = _LAYOUTS[self.layout][0](b[:, None], s) if b is not None else (None, None, None)
            qb, kb, vb = (x[..., 0] if x is not None else None for x in (qb, kb, vb))
        att = Attention(
            q=q.reshape(H, d, D),
            k=k.reshape(Hkv, d, D),
            v=v.reshape(Hkv, d, D),
            o=t[f"{self.o}.weight"].reshape(D, H, d),
            q_bias=None if qb is None else qb.reshape(H, d),
            k_bias=None if kb is None else kb.reshape(Hkv, d),
            v_bias=None if vb is None else vb.reshape(Hkv, d),
        )
        # Norm weights of size H*d (olmo2) or [H, d] (cohere) belong to heads; size d is shared and left alone.
        for attr, name, heads in (("q_norm", self.q_norm, H), ("k_norm", self.k_norm, Hkv)):
            w = t.get(f"{name}.weight")
            if w is not None and w.numel() == heads * d and heads > 1:
                setattr(att, attr, w.reshape(heads, d))
                att.norms_2d = w.dim() == 2
        return att

    def join(self, layer: int, att: Attention, keys: list[str], s: Shapes) -> dict[str, Tensor]:
        """Canonical form -> checkpoint tensors (float32; the caller casts). `s` holds the output shapes.

        Keys of the layer that are not returned (norms shared by all heads) pass through unchanged."""
        p = self.prefix.format(i=layer)
        H, G, d, D = att.num_heads, att.num_kv_heads, s.head_dim, s.hidden
        out: dict[str, Tensor] = {}
        if self.layout == "split":
            parts = {self.q: (att.q, att.q_bias), self.k: (att.k, att.k_bias), self.v: (att.v, att.v_bias)}
            for name, (w, b) in parts.items():
                out[f"{p}{name}.weight"] = w.reshape(-1, D)
                if b is not None:
                    out[f"{p}{name}.bias"] = b.reshape(-1)
        else:
            join = _LAYOUTS[self.layout][1]
            out[f"{p}{self.fused}.weight"] = join(att.q, att.k, att.v, s, G).reshape(-1, D)
            if att.q_bias is not None:
                bias = join(att.q_bias[..., None], att.k_bias[..., None], att.v_bias[..., None], s, G)
                out[f"{p}{self.fused}.bias"] = bias.reshape(-1)
        out[f"{p}{self.o}.weight"] = att.o.reshape(D, H * d)
        # Per-head norms are rewritten; a norm shared by all heads is not produced and passes through as it is.
        for attr, name in (("q_norm", self.q_norm), ("k_norm", self.k_norm)):
            w = getattr(att, attr)
            if w is not None:
                out[f"{p}{name}.weight"] = w if att.norms_2d else w.reshape(-1)
        return out

    def pools_by_rows(self) -> bool:
        """Whether weight-only pooling can work on the stored tensors as they are (numpy, no torch): K and V are
        their own tensors with the heads as leading rows (split), or `pool_fused` knows the fused arrangement."""
        return self.layout == "split" or self.layout in _LAYOUTS

    def pool_fused(self, x: Any, s_in: Shapes, s_out: Shapes, pool: Callable[[Any, int], Any]) -> Any:
        """A fused q/k/v weight [rows, D] (a bias as [rows, 1]), float32 numpy or torch, with K and V pooled by
        `pool` ([Hkv, n] -> [G, n]) and the rows arranged as the output layout has them. Queries are moved, never
        changed: this is `split`, pool, `join` for weight-only methods, without the per-head Attention form."""
        split, join = _LAYOUTS[self.layout]
        H, Hkv, G, d = s_in.num_heads, s_in.num_kv_heads, s_out.num_kv_heads, s_in.head_dim
        cols = x.shape[-1]
        q, k, v = split(x, s_in)
        k = pool(k.reshape(Hkv, -1), G).reshape(G, d, cols)  # [G, d, cols]
        v = pool(v.reshape(Hkv, -1), G).reshape(G, d, cols)
        return join(q.reshape(H, d, cols), k, v, s_out, G).reshape(-1, cols)


# ---------------------------------------------------------------------------------------------------------------
# Fused layouts. Each is a (split, join) pair over row blocks; `x` is [rows, cols] with rows = heads * d.


def _concat_split(x: Tensor, s: Shapes) -> tuple[Tensor, Tensor, Tensor]:
    # [q heads | k heads | v heads]
    nq, nk = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    return x[:nq], x[nq : nq + nk], x[nq + nk :]


def _xp(x: Any) -> Any:
    """numpy for a numpy array, else torch: the fused layouts run on both (numpy on the torch-free path)."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def _concat_join(q: Tensor, k: Tensor, v: Tensor, s: Shapes, groups: int) -> Tensor:
    cols = q.shape[-1]
    return _xp(q).concatenate([q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)])


def _falcon_split(x: Tensor, s: Shapes) -> tuple[Tensor, Tensor, Tensor]:
    """Falcon's three arrangements of query_key_value rows, told apart by the row count.

    new architecture   [Hkv, H/Hkv + 2, d]: each KV group's query heads, then its k, then its v
    multi-query        [H + 2, d]: all query heads, then the single k, then the single v
    classic MHA        [H, 3, d]: q, k, v interleaved head by head
    """
    H, Hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    cols = x.shape[-1]
    if s_falcon_classic(x, s):
        x = x.reshape(H, 3, d, cols)
        return x[:, 0], x[:, 1], x[:, 2]
    x = x.reshape(Hkv, H // Hkv + 2, d, cols)
    return x[:, :-2].reshape(H, d, cols), x[:, -2], x[:, -1]


def s_falcon_classic(x: Tensor, s: Shapes) -> bool:
    # Classic MHA and the grouped layout with Hkv == H have the same row count; FalconShapes marks which one.
    return isinstance(s, FalconShapes) and s.classic


def _falcon_join(q: Tensor, k: Tensor, v: Tensor, s: Shapes, groups: int) -> Tensor:
    xp = _xp(q)
    H, d = q.shape[0], q.shape[1]
    cols = q.shape[-1]
    if groups == H and s_falcon_classic(q, s):
        return xp.stack([q, k, v], 1).reshape(-1, cols)
    # Grouped (new architecture); with groups == 1 this is also the multi-query arrangement.
    q = q.reshape(groups, H // groups, d, cols)
    return xp.concatenate([q, k[:, None], v[:, None]], 1).reshape(-1, cols)


@dataclass(frozen=True)
class FalconShapes(Shapes):
    classic: bool = False  # rows interleaved [H, 3, d] (old architecture without multi_query)


_LAYOUTS = {"concat": (_concat_split, _concat_join), "falcon": (_falcon_split, _falcon_join)}
