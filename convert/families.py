"""Where each transformers family keeps its attention weights, as data.

Every family is one `Family` row: the prefix of a layer's attention tensors, the projection names, which of the
three weight layouts it uses, and the config key that holds the KV-head count. The converter never branches on
`model_type`; it reads the row and uses the layout's `split`/`join` pair to move between the checkpoint tensors and
the canonical per-head form (`Attention`) that the merge methods work on.

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


class ConversionError(ValueError):
    """A bad input: the message names the problem and the fix."""


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


@dataclass(frozen=True)
class Family:
    """How one group of `model_type`s stores attention."""

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
    kv_key: str = "num_key_value_heads"
    # config.json keys the shapes read besides the common sizes (absent ones fall back to transformers' defaults)
    config_keys: tuple[str, ...] = ("num_key_value_heads",)
    notes: str = ""
    # Tensor-name fragments that mean "this checkpoint uses a variant we cannot express": fragment -> reason.
    refuse: Mapping[str, str] = field(default_factory=dict)
    # Family-specific reading of the current KV-head count and patching of the raw config.json.
    kv_heads: Callable[[Any], int] | None = None
    patch: Callable[[dict, int], dict] | None = None
    rotary: bool = True  # False: positions are learned embeddings (gpt_bigcode), no rotary dims in any head

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


# ---------------------------------------------------------------------------------------------------------------
# Fused layouts. Each is a (split, join) pair over row blocks; `x` is [rows, cols] with rows = heads * d.


def _concat_split(x: Tensor, s: Shapes) -> tuple[Tensor, Tensor, Tensor]:
    # [q heads | k heads | v heads]
    nq, nk = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    return x[:nq], x[nq : nq + nk], x[nq + nk :]


def _concat_join(q: Tensor, k: Tensor, v: Tensor, s: Shapes, groups: int) -> Tensor:
    import torch

    cols = q.shape[-1]
    return torch.cat([q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)])


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
    import torch

    H, d = q.shape[0], q.shape[1]
    cols = q.shape[-1]
    if groups == H and s_falcon_classic(q, s):
        return torch.stack([q, k, v], dim=1).reshape(-1, cols)
    # Grouped (new architecture); with groups == 1 this is also the multi-query arrangement.
    q = q.reshape(groups, H // groups, d, cols)
    return torch.cat([q, k[:, None], v[:, None]], dim=1).reshape(-1, cols)


@dataclass(frozen=True)
class FalconShapes(Shapes):
    classic: bool = False  # rows interleaved [H, 3, d] (old architecture without multi_query)


_LAYOUTS = {"concat": (_concat_split, _concat_join), "falcon": (_falcon_split, _falcon_join)}


def _falcon_kv_heads(config: Any) -> int:
    if config.new_decoder_architecture:
        return int(config.num_kv_heads)
    return 1 if config.multi_query else int(config.num_attention_heads)


def _falcon_patch(raw: dict, groups: int) -> dict:
    """Falcon expresses G through its architecture flags, not only a head count."""
    heads = raw.get("num_attention_heads", 71)
    if raw.get("new_decoder_architecture"):
        return {**raw, "num_kv_heads": groups}
    if groups == heads:
        return raw
    if groups == 1:
        return {**raw, "multi_query": True}
    if not raw.get("parallel_attn", True):
        raise ConversionError(
            "falcon with sequential attention (parallel_attn=false) can only become multi-query: use --num-kv-heads 1"
        )
    # The new architecture with one shared layer norm computes exactly what classic parallel attention does.
    return {**raw, "new_decoder_architecture": True, "num_ln_in_parallel_attn": 1, "num_kv_heads": groups}


def _bigcode_kv_heads(config: Any) -> int:
    return 1 if config.multi_query else int(config.num_attention_heads)


def _bigcode_patch(raw: dict, groups: int) -> dict:
    """gpt_bigcode holds every head's K/V or one shared pair (multi_query): no count in between."""
    heads = raw.get("n_head", raw.get("num_attention_heads"))
    if raw.get("multi_query", True) or groups == heads:
        return raw
    if groups == 1:
        return {**raw, "multi_query": True, **({"num_key_value_heads": 1} if "num_key_value_heads" in raw else {})}
    raise ConversionError(
        f"gpt_bigcode holds {heads} KV heads or one (multi_query), not {groups}: use --num-kv-heads 1, or pass "
        "--write-modeling-code for the shipped-code route, which writes modeling code that holds any G"
    )


def _stablelm_refuse() -> dict[str, str]:
    return {
        "k_layernorm.norms.": "stablelm with qk_layernorm=true keeps one norm module per KV head; "
        "the merged checkpoint could not keep the same tensor names"
    }


FAMILIES: tuple[Family, ...] = (
    Family(
        model_types=(
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "olmoe",
            "starcoder2",
            "granite",
            "granitemoe",
            "cohere",
            "cohere2",
            "nemotron",
            "exaone4",
            "apertus",
            "seed_oss",
            "ernie4_5",
            "arcee",
            "smollm3",
        ),
    ),
    Family(model_types=("stablelm",), refuse=_stablelm_refuse()),
    Family(model_types=("phi",), o="dense", q_norm="q_layernorm", k_norm="k_layernorm"),
    Family(model_types=("phi3",), fused="qkv_proj", layout="concat"),
    Family(
        model_types=("falcon",),
        prefix="transformer.h.{i}.self_attention.",
        o="dense",
        fused="query_key_value",
        layout="falcon",
        kv_key="num_kv_heads",
        config_keys=("new_decoder_architecture", "multi_query", "num_kv_heads"),
        kv_heads=_falcon_kv_heads,
        patch=_falcon_patch,
        notes="classic MHA falcon becomes multi-query (G=1) or the new grouped architecture (1<G<H)",
    ),
    # Per-head [H, 3, d] rows without multi_query, [q heads | k | v] with it: falcon's classic and multi-query
    # arrangements. Also the target of the gpt2 and opt routes (convert.reexpress).
    Family(
        model_types=("gpt_bigcode",),
        prefix="transformer.h.{i}.attn.",
        o="c_proj",
        fused="c_attn",
        layout="falcon",
        kv_key="num_key_value_heads",
        config_keys=("multi_query",),
        kv_heads=_bigcode_kv_heads,
        patch=_bigcode_patch,
        rotary=False,
        notes="MHA gpt_bigcode becomes multi-query (G=1)",
    ),
)

# Families whose q/k norms make a merged key only approximately equal to the pooled source keys.
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe", "olmo2", "olmoe", "gemma3_text", "cohere", "exaone4", "apertus")


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    from .reexpress import SHIPPED_CODE_ONLY, needs_shipped_code, source_types  # here: reexpress imports us

    if model_type in SHIPPED_CODE_ONLY:
        raise needs_shipped_code(SHIPPED_CODE_ONLY[model_type])
    routed = [t for t in source_types() if t not in SHIPPED_CODE_ONLY]
    if model_type in routed:
        raise ConversionError(
            f"{model_type}'s transformers class has no KV-head count: convert its checkpoint folder "
            "(convert_checkpoint, gqa-convert convert), which re-expresses it as a stock class that has one"
        )
    raise ConversionError(
        f"unsupported model_type {model_type!r}: gqa-convert knows {', '.join(supported_model_types())}, and "
        f"{', '.join(routed)} through a stock class (convert.reexpress). "
        "Add a row to convert/families.py:FAMILIES if its attention fits one of the layouts there."
    )


def shapes_for(family: Family, config: Any) -> Shapes:
    """Every size from the config: heads, KV heads, head_dim (explicit where set), rotary width."""
    H = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // H
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:  # per-layer-type rope (gemma3): same factor assumed
        rope = rope["full_attention"]
    factor = rope.get("partial_rotary_factor") if rope else None
    factor = factor or getattr(config, "partial_rotary_factor", None) or 1.0  # older configs keep it at top level
    uses_alibi = bool(getattr(config, "alibi", False))
    rotary_dim = 0 if uses_alibi or not family.rotary else int(head_dim * factor)
    base = dict(
        num_heads=H,
        num_kv_heads=family.current_kv_heads(config),
        head_dim=int(head_dim),
        hidden=hidden,
        num_layers=int(config.num_hidden_layers),
        rotary_dim=rotary_dim,
    )
    if family.layout == "falcon":
        classic = not getattr(config, "new_decoder_architecture", False) and not config.multi_query
        return FalconShapes(**base, classic=classic)
    return Shapes(**base)


def output_shapes(s: Shapes, groups: int, raw_config: dict, family: Family) -> Shapes:
    """Shapes after conversion (falcon may change arrangement)."""
    if isinstance(s, FalconShapes):
        patched = family.patch_config(raw_config, groups)
        classic = not patched.get("new_decoder_architecture") and not patched.get("multi_query")
        return FalconShapes(**{**s.__dict__, "num_kv_heads": groups, "classic": classic})
    return replace(s, num_kv_heads=groups)
