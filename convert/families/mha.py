"""The classic multi-head families (gpt2, opt, bloom, mpt) as `Family` rows, and when they need shipped code.

Their stock transformers classes have no KV-head count, so below H KV heads the output is loaded by modeling code
shipped with the checkpoint (`convert.routes.shipped`, templates in `convert/routes/modeling/`). Each row also
lists the output `model_type` (gqa_<x>): the converter re-opens what it wrote, and `inspect` reads it, without
running that code.

Layouts of the fused projection, rows of the [out, in] weight (GPT-2's Conv1D stores [in, out]: transposed here):
    concat     [q heads | k heads | v heads]              gpt2 c_attn, mpt Wqkv; kept as is with G heads
    headwise   [G, H/G + 2, d]: each group's query heads,  bloom query_key_value: at G = H this is bloom's own
               then its k head, then its v head            [H, 3, d] (q, k, v head by head)
OPT keeps separate q/k/v projections (the `split` layout of convert.families).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.families.row import Attention, Family, Getter, Shapes

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class MhaFamily(Family):
    """A Family whose fused rows may be transposed (Conv1D) or arranged per head, read with a stock config class."""

    config_class: str = ""  # the transformers config class that reads both the source and the gqa_<x> config.json
    template: str = ""  # convert/routes/modeling/<template>: the shipped code for G < H
    transposed: bool = False  # weights stored [in, out] (Conv1D)
    alibi: bool = False  # position information is an ALiBi bias: no rotary dims

    def pools_by_rows(self) -> bool:
        # Conv1D's [in, out] and the per-head arrangement are this class's own: `Family.pool_fused` knows neither.
        return self.layout == "split"

    def config_view(self, raw: dict) -> Any:
        """The config object for `shapes_for`, from the stock class: never runs shipped code."""
        import transformers

        cls = getattr(transformers, self.config_class)
        drop = ("auto_map", "model_type", "architectures", self.kv_key)
        config = cls.from_dict({k: v for k, v in raw.items() if k not in drop})
        heads = int(config.num_attention_heads)
        view = SimpleNamespace(
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get(self.kv_key) or heads),
            hidden_size=int(config.hidden_size),
            num_hidden_layers=int(config.num_hidden_layers),
            alibi=self.alibi,
        )
        for refused, reason in _refusals(raw):
            if refused:
                raise ConversionError(f"unsupported {raw.get('model_type')} checkpoint: {reason}")
        return view

    def for_keys(self, keys: set[str]) -> MhaFamily:
        """The row for a checkpoint saved from the base model (hub gpt2, opt, bloom): names without the
        `transformer.` / `model.` prefix, which transformers adds back on load."""
        if any(k.startswith(self.prefix.format(i=0)) for k in keys):
            return self
        short = self.prefix.split(".", 1)[1]
        return replace(self, prefix=short) if any(k.startswith(short.format(i=0)) for k in keys) else self

    def planned_shapes(
        self, layer: int, shapes: Mapping[str, tuple[int, ...]], s_in: Shapes, s_out: Shapes
    ) -> dict[str, tuple[int, ...]]:
        if self.layout == "split":
            return super().planned_shapes(layer, shapes, s_in, s_out)
        p = self.prefix.format(i=layer)
        rows = (s_in.num_heads + 2 * s_out.num_kv_heads) * s_in.head_dim
        out = dict(shapes)
        for key, shape in shapes.items():
            if key == f"{p}{self.fused}.bias":
                out[key] = (rows,)
            elif key == f"{p}{self.fused}.weight":
                out[key] = (shape[0], rows) if self.transposed else (rows, shape[1])
        return out

    def split(self, layer: int, get: Getter, keys: list[str], s: Shapes) -> Attention:
        if self.layout == "split":
            return super().split(layer, get, keys, s)
        p = self.prefix.format(i=layer)
        t = {k[len(p) :]: get(k).float() for k in keys}
        w, b = t[f"{self.fused}.weight"], t.get(f"{self.fused}.bias")
        o = t[f"{self.o}.weight"]
        if self.transposed:
            w, o = w.T, o.T  # [in, out] -> [out, in]
        H, Hkv, d, D = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden
        q, k, v = _ARRANGEMENTS[self.layout][0](w, H, Hkv, d)
        qb, kb, vb = _ARRANGEMENTS[self.layout][0](b[:, None], H, Hkv, d) if b is not None else (None,) * 3
        return Attention(
            q=q.reshape(H, d, D),
            k=k.reshape(Hkv, d, D),
            v=v.reshape(Hkv, d, D),
            o=o.reshape(D, H, d),
            q_bias=None if qb is None else qb.reshape(H, d),
            k_bias=None if kb is None else kb.reshape(Hkv, d),
            v_bias=None if vb is None else vb.reshape(Hkv, d),
        )

    def join(self, layer: int, att: Attention, keys: list[str], s: Shapes) -> dict[str, Tensor]:
        if self.layout == "split":
            return super().join(layer, att, keys, s)
        p = self.prefix.format(i=layer)
        H, d, D = att.num_heads, s.head_dim, s.hidden
        join = _ARRANGEMENTS[self.layout][1]
        w = join(att.q, att.k, att.v).reshape(-1, D)  # [(H + 2G) d, D]
        o = att.o.reshape(D, H * d)
        out = {
            f"{p}{self.fused}.weight": w.T.contiguous() if self.transposed else w,  # back to Conv1D's [in, out]
            f"{p}{self.o}.weight": o.T.contiguous() if self.transposed else o,
        }
        if att.q_bias is not None:
            out[f"{p}{self.fused}.bias"] = join(
                att.q_bias[..., None], att.k_bias[..., None], att.v_bias[..., None]
            ).reshape(-1)
        return out


def _concat_split(x: Tensor, H: int, Hkv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    return x[: H * d], x[H * d : (H + Hkv) * d], x[(H + Hkv) * d :]


def _concat_join(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    import torch

    cols = q.shape[-1]
    return torch.cat([q.reshape(-1, cols), k.reshape(-1, cols), v.reshape(-1, cols)])


def _headwise_split(x: Tensor, H: int, Hkv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    x = x.reshape(Hkv, H // Hkv + 2, d, x.shape[-1])  # [G, queries of the group + k + v, d, cols]
    return x[:, :-2].reshape(H, d, -1), x[:, -2], x[:, -1]


def _headwise_join(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    import torch

    H, G, d, cols = q.shape[0], k.shape[0], q.shape[1], q.shape[-1]
    return torch.cat([q.reshape(G, H // G, d, cols), k[:, None], v[:, None]], dim=1).reshape(-1, cols)


_ARRANGEMENTS = {"concat": (_concat_split, _concat_join), "headwise": (_headwise_split, _headwise_join)}


def _refusals(raw: dict) -> list[tuple[bool, str]]:
    """Variants the shipped code does not express: (condition, reason with the way out)."""
    attn = raw.get("attn_config") or {}
    return [
        (
            bool(raw.get("add_cross_attention")),
            "gpt2 with cross-attention (add_cross_attention=true) is an encoder-"
            "decoder part, not a causal LM: convert the decoder-only checkpoint",
        ),
        (
            bool(attn.get("qk_ln")),
            "mpt with qk_ln=true normalizes all heads' keys together; merged KV heads cannot keep that norm",
        ),
        (
            bool(attn.get("prefix_lm") or attn.get("attn_uses_sequence_id")),
            "mpt prefix-LM / sequence-id attention is not supported by transformers' MptForCausalLM",
        ),
        (attn.get("alibi") is False, "mpt without alibi is not supported by transformers' MptForCausalLM"),
        (
            attn.get("attn_type", "multihead_attention") != "multihead_attention",
            f"mpt with attn_type={attn.get('attn_type')!r} is not supported by transformers' MptForCausalLM",
        ),
    ]


MHA_FAMILIES: tuple[MhaFamily, ...] = (
    MhaFamily(
        model_types=("gpt2", "gqa_gpt2"),
        prefix="transformer.h.{i}.attn.",
        o="c_proj",
        fused="c_attn",
        layout="concat",
        config_class="GPT2Config",
        template="gpt2",
        transposed=True,
        notes="Conv1D weights [in, out]; below H KV heads: shipped code (gqa_gpt2)",
    ),
    MhaFamily(
        model_types=("opt", "gqa_opt"),
        prefix="model.decoder.layers.{i}.self_attn.",
        o="out_proj",
        config_class="OPTConfig",
        template="opt",
        notes="separate projections with biases; below H KV heads: shipped code (gqa_opt)",
    ),
    MhaFamily(
        model_types=("bloom", "gqa_bloom"),
        prefix="transformer.h.{i}.self_attention.",
        o="dense",
        fused="query_key_value",
        layout="headwise",
        config_class="BloomConfig",
        template="bloom",
        alibi=True,
        notes="per-head [q, k, v] rows, ALiBi; below H KV heads: shipped code (gqa_bloom)",
    ),
    MhaFamily(
        model_types=("mpt", "gqa_mpt"),
        prefix="transformer.blocks.{i}.attn.",
        o="out_proj",
        fused="Wqkv",
        layout="concat",
        config_class="MptConfig",
        template="mpt",
        alibi=True,
        notes="Wqkv [q | k | v], ALiBi; below H KV heads: shipped code (gqa_mpt)",
    ),
)


def takes_shipped_route(raw: dict, groups: int | None) -> bool:
    """Whether a classic MHA source is read with these rows (as it is, shipped code below H) rather than
    re-expressed as a stock class (convert.routes.reexpress, where that route exists). bloom, mpt and every gqa_<x>
    output: always. gpt2 and pre-LN opt: only at 1 < G < H, where no stock class holds G (at G = 1 gpt_bigcode's
    multi-query does). Post-LN opt (opt-350m): below H. `groups` None (inspect): the stock route where there is one.
    """
    family = next((f for f in MHA_FAMILIES if raw.get("model_type") in f.model_types), None)
    if family is None:
        return False
    if family.template not in ("gpt2", "opt") or raw["model_type"].startswith("gqa_"):
        return True
    if groups is None:
        return False
    heads = family.config_view(raw).num_attention_heads
    post_ln = raw["model_type"] == "opt" and raw.get("do_layer_norm_before") is False
    return groups < heads and (groups > 1 or post_ln)


def modeling_template(family: Family, groups: int, num_heads: int) -> str | None:
    """The shipped-code template a conversion to `groups` KV heads needs, or None (the stock class holds it)."""
    if not isinstance(family, MhaFamily):
        return None
    return family.template if groups < num_heads else None
