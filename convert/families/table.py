"""The table: one `Family` row per group of `model_type`s that share every fact the converter uses.

Adding a family is adding a row here (and a tiny config in tests/helpers/tiny.py): the converter never branches on
`model_type`, it reads the row. `defaults` hold what the family's transformers config class assumes for keys a
published config.json may omit; tests/families/test_configs.py checks them against the config classes themselves.
"""

from __future__ import annotations

from typing import Any

from convert.errors import ConversionError
from convert.families.mha import MHA_FAMILIES
from convert.families.row import Family
from convert.families.t5 import T5_FAMILIES
from convert.routes.reexpress import source_types

KV = "num_key_value_heads"


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
        return {**raw, "multi_query": True, **({KV: 1} if KV in raw else {})}
    raise ConversionError(
        f"gpt_bigcode holds {heads} KV heads or one (multi_query), not {groups}: use --num-kv-heads 1 or {heads}"
    )


_STABLELM_REFUSE = {
    "k_layernorm.norms.": "stablelm with qk_layernorm=true keeps one norm module per KV head; "
    "the merged checkpoint could not keep the same tensor names"
}
FAMILIES: tuple[Family, ...] = (
    # Split q/k/v projections under model.layers.{i}.self_attn: the llama shape, with each family's defaults.
    Family(("llama", "granite", "granitemoe", "arcee", "olmo")),
    Family(("mistral", "mixtral"), defaults={KV: 8}),
    Family(("qwen2",), defaults={KV: 32}),
    Family(("qwen2_moe",), defaults={KV: 16}),
    Family(("qwen3",), qk_norm="shared", defaults={KV: 32, "head_dim": 128}),
    Family(("qwen3_moe",), qk_norm="shared", defaults={KV: 4}),
    Family(("gemma",), defaults={KV: 16, "head_dim": 256}),
    Family(("gemma2",), defaults={KV: 4, "head_dim": 256}),
    Family(("gemma3_text",), qk_norm="shared", rope_by_layer_type=True, defaults={KV: 4, "head_dim": 256}),
    Family(("olmo2", "olmoe"), qk_norm="flat"),
    Family(("starcoder2",), defaults={KV: 2}),
    Family(("cohere",), qk_norm="per_head", rotary="interleaved"),
    Family(("cohere2",), rotary="interleaved"),
    Family(("ernie4_5",), rotary="interleaved", defaults={KV: 2, "head_dim": 128}),
    Family(("nemotron",), defaults={"partial_rotary_factor": 0.5}),
    Family(("exaone4",), qk_norm="shared", defaults={KV: 32}),
    Family(("apertus",), qk_norm="shared"),
    Family(("seed_oss",), defaults={KV: 8, "head_dim": 128}),
    Family(("smollm3",), defaults={KV: 4}),
    Family(("stablelm",), refuse=_STABLELM_REFUSE, defaults={KV: 32, "partial_rotary_factor": 0.25}),
    Family(
        ("phi",),
        o="dense",
        q_norm="q_layernorm",
        k_norm="k_layernorm",
        defaults={"partial_rotary_factor": 0.5},
    ),
    Family(("phi3",), fused="qkv_proj", layout="concat"),
    Family(
        ("falcon",),
        prefix="transformer.h.{i}.self_attention.",
        o="dense",
        fused="query_key_value",
        layout="falcon",
        kv_key="num_kv_heads",
        defaults={"new_decoder_architecture": False, "multi_query": True, "alibi": False},
        names={"hidden_size": ("n_embed",)},
        kv_heads=_falcon_kv_heads,
        patch=_falcon_patch,
        notes="classic MHA falcon becomes multi-query (G=1) or the new grouped architecture (1<G<H)",
    ),
    # c_attn rows per head [H, 3, d] without multi_query, [q heads | k | v] with it: falcon's classic and
    # multi-query arrangements. Also the output class of the gpt2 and opt stock routes (convert.routes.reexpress).
    Family(
        ("gpt_bigcode",),
        prefix="transformer.h.{i}.attn.",
        o="c_proj",
        fused="c_attn",
        layout="falcon",
        rotary="",
        defaults={"multi_query": True},
        names={"num_attention_heads": ("n_head",), "hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",)},
        kv_heads=_bigcode_kv_heads,
        patch=_bigcode_patch,
        notes="MHA gpt_bigcode becomes multi-query (G=1)",
    ),
)


FAMILIES = FAMILIES + MHA_FAMILIES + T5_FAMILIES

# Derived views of the table, for callers that ask about a model_type rather than a row.
QK_NORM_FAMILIES = tuple(t for f in FAMILIES if f.qk_norm for t in f.model_types)
INTERLEAVED_ROTARY = tuple(t for f in FAMILIES if f.rotary == "interleaved" for t in f.model_types)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def stock_kv_model_types() -> list[str]:
    """The model_types whose own transformers class holds a KV-head count (no re-expression, no shipped code)."""
    return sorted(t for f in FAMILIES if f not in MHA_FAMILIES + T5_FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    if model_type in source_types():
        raise ConversionError(
            f"{model_type}'s transformers class has no KV-head count: convert its checkpoint folder "
            "(convert_checkpoint, gqa-convert convert), which re-expresses it as a stock class that has one"
        )
    raise ConversionError(
        f"unsupported model_type {model_type!r}: gqa-convert knows {', '.join(supported_model_types())}. "
        "Add a row to convert/families/table.py:FAMILIES if its attention fits one of the layouts there."
    )
