"""T5 and mT5 as sources: the decoder's two attention modules per block, explicit d_kv, and shipped modeling code.

The converter walks "layers" by index and formats the family prefix with it. T5's decoder block b holds two
attention modules, so the T5 row counts attention modules instead of blocks:

    index 2b     decoder.block.{b}.layer.0.SelfAttention.{q,k,v,o}
    index 2b+1   decoder.block.{b}.layer.1.EncDecAttention.{q,k,v,o}

The encoder is not in the walk: its tensors pass through byte for byte, and so does the relative position bias
(`relative_attention_bias`, one column per query head), which is not one of the projections.

transformers' T5 classes have no KV-head count, so below H KV heads the output ships the `t5` template
(`convert/routes/modeling/t5/`, through `convert.routes.shipped`): model_type gqa_t5, `num_key_value_heads` = G.
mT5 has T5.1.1's architecture; its output is a gqa_t5 model too (mT5 never scales the decoder output,
which T5Config says with tie_word_embeddings=false).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convert.errors import ConversionError
from convert.families.mha import MhaFamily
from convert.families.row import Shapes


class _DecoderAttentionPrefix(str):
    """A prefix whose `format(i=...)` names attention module i of the decoder (see the module docstring): the
    converter's walk over layers then reaches both of a block's attention modules without knowing about blocks."""

    def format(self, *args: Any, i: int = 0, **kwargs: Any) -> str:
        kind = "layer.0.SelfAttention" if i % 2 == 0 else "layer.1.EncDecAttention"
        return f"decoder.block.{i // 2}.{kind}."


def t5_shapes(config: Any) -> Shapes:
    """Sizes of a T5 config: head_dim is d_kv (not d_model / heads in T5.1.1), two attention modules per block."""
    heads = int(config.num_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    decoder_layers = getattr(config, "num_decoder_layers", None) or config.num_layers
    return Shapes(
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(config.d_kv),
        hidden=int(config.d_model),
        num_layers=2 * int(decoder_layers),
        rotary_dim=0,  # relative position bias, no rotary
    )


def t5_patch(raw: dict, groups: int) -> dict:
    """config.json of the output: G (the shipped code, below H, also sets model_type and auto_map)."""
    raw = {**raw, "num_key_value_heads": groups}
    if raw.get("model_type") == "mt5":
        raw["tie_word_embeddings"] = False  # read by T5Config as "do not scale the decoder output", as mT5 does
    return raw


@dataclass(frozen=True)
class T5Family(MhaFamily):
    """T5's row: sizes from T5Config (d_kv, decoder layers), read with the stock config class."""

    def for_keys(self, keys: set[str]) -> T5Family:
        # T5 checkpoints always name the decoder from the top (`decoder.block...`): no base-model prefix to strip.
        return self

    def config_view(self, raw: dict) -> Any:
        """transformers' T5Config of a source or of a converted gqa_t5 folder, without running shipped code."""
        import transformers

        architectures = raw.get("architectures") or []
        if raw.get("is_encoder_decoder") is False or (architectures and all("Encoder" in a for a in architectures)):
            what = ", ".join(architectures) or "no decoder"
            raise ConversionError(
                f"this {raw.get('model_type')} checkpoint is encoder-only ({what}): "
                "GQA shrinks the decoder's caches and it has no decoder. Convert the full encoder-decoder checkpoint"
            )
        drop = ("auto_map", "model_type", "architectures", self.kv_key)
        config = getattr(transformers, self.config_class).from_dict({k: v for k, v in raw.items() if k not in drop})
        config.num_key_value_heads = int(raw.get(self.kv_key) or config.num_heads)
        return config


def cache_bytes(s: Shapes, groups: int, element_bytes: int) -> dict[str, int]:
    """The decoder's two caches, all layers, K and V: self-attention grows by one generated token at a time,
    cross-attention holds one entry per input (encoder) token."""
    per_stack = 2 * (s.num_layers // 2) * groups * s.head_dim * element_bytes
    return {"self_attention_per_output_token": per_stack, "cross_attention_per_input_token": per_stack}


def cache_notes(s: Shapes, before: int, after: int, element_bytes: int) -> list[str]:
    """What 'KV cache per token' means for an encoder-decoder, with both caches before and after."""
    b, a = cache_bytes(s, before, element_bytes), cache_bytes(s, after, element_bytes)
    line = (
        "encoder-decoder: 'KV cache per token' counts one generated token's self-attention cache plus one input "
        "token's cross-attention cache (which scales with the input length)"
    )
    if before == after:  # inspect: also say what its layer count counts
        modules = s.num_layers
        return [
            f"{line}: each is half of it. 'layers' counts the decoder's {modules} attention modules (self and cross)"
        ]
    self_b, self_a = b["self_attention_per_output_token"], a["self_attention_per_output_token"]
    cross_b, cross_a = b["cross_attention_per_input_token"], a["cross_attention_per_input_token"]
    return [
        f"{line}. Self-attention: {self_b:,} -> {self_a:,} B per generated token; cross-attention: "
        f"{cross_b:,} -> {cross_a:,} B per input token"
    ]


def _row(model_types: tuple[str, ...], config_class: str) -> T5Family:
    return T5Family(
        model_types=model_types,
        prefix=_DecoderAttentionPrefix("decoder.block.{i}."),
        q="q",
        k="k",
        v="v",
        o="o",
        patch=t5_patch,
        read_shapes=t5_shapes,
        cache_notes=cache_notes,
        config_class=config_class,
        template="t5",
        notes="decoder self- and cross-attention pooled; encoder and relative position bias untouched; below H KV "
        "heads: shipped code (gqa_t5)",
    )


T5_FAMILIES: tuple[T5Family, ...] = (_row(("t5", "gqa_t5"), "T5Config"), _row(("mt5",), "MT5Config"))
T5_MODEL_TYPES = ("t5", "gqa_t5", "mt5")
