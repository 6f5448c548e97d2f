"""T5 and mT5 as sources: the decoder's two attention modules per block, explicit d_kv, and shipped modeling code.

The converter walks "layers" by index and formats the family prefix with it. T5's decoder block b holds two
attention modules, so the T5 row counts attention modules instead of blocks:

    index 2b     decoder.block.{b}.layer.0.SelfAttention.{q,k,v,o}
    index 2b+1   decoder.block.{b}.layer.1.EncDecAttention.{q,k,v,o}

The encoder is not in the walk: its tensors pass through byte for byte, and so does the relative position bias
(`relative_attention_bias`, one column per query head), which is not one of the projections.

transformers' T5 classes have no KV-head count, so a converted T5 ships `convert/modeling/t5/modeling_t5_gqa.py`
and names it in `auto_map`; `num_key_value_heads` in config.json says G.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .families import ConversionError, Family, Shapes

if TYPE_CHECKING:
    import torch

TEMPLATE = Path(__file__).parent / "modeling" / "t5"
MODELING_FILE = "modeling_t5_gqa.py"
MODEL_CLASSES = {"t5": "T5GQAForConditionalGeneration", "mt5": "MT5GQAForConditionalGeneration"}


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


def _t5_kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_heads)


def t5_patch(raw: dict, groups: int) -> dict:
    """config.json of the output: G, and the shipped class that reads it."""
    if raw.get("is_encoder_decoder") is False:
        raise ConversionError("this T5 config is encoder-only (is_encoder_decoder=false): it has no decoder to convert")
    cls = MODEL_CLASSES[raw["model_type"]]
    auto_map = {"AutoModelForSeq2SeqLM": f"{MODELING_FILE[:-3]}.{cls}"}
    return {**raw, "num_key_value_heads": groups, "architectures": [cls], "auto_map": auto_map}


def ship_t5_modeling(folder: Path) -> list[str]:
    """Copy the modeling code `auto_map` names into the output folder; returns the file names written."""
    shutil.copyfile(TEMPLATE / MODELING_FILE, Path(folder) / MODELING_FILE)
    return [MODELING_FILE]


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
    if before == after:
        return [line + ": each is half of it"]
    self_b, self_a = b["self_attention_per_output_token"], a["self_attention_per_output_token"]
    cross_b, cross_a = b["cross_attention_per_input_token"], a["cross_attention_per_input_token"]
    return [
        f"{line}. Self-attention: {self_b:,} -> {self_a:,} B per generated token; cross-attention: "
        f"{cross_b:,} -> {cross_a:,} B per input token"
    ]


T5_FAMILY = Family(
    model_types=("t5", "mt5"),
    prefix=_DecoderAttentionPrefix("decoder.block.{i}."),
    q="q",
    k="k",
    v="v",
    o="o",
    config_keys=("num_heads", "d_kv", "d_model", "num_decoder_layers"),
    kv_heads=_t5_kv_heads,
    patch=t5_patch,
    read_shapes=t5_shapes,
    ship_files=ship_t5_modeling,
    cache_notes=cache_notes,
    methods=("mean", "first", "random"),  # calibration runs a causal LM, not an encoder-decoder
    notes="decoder self- and cross-attention pooled; encoder and relative position bias untouched; ships modeling "
    "code (trust_remote_code=True)",
)


def convert_t5_model(
    model: "torch.nn.Module", num_kv_heads: int, method: str = "mean", seed: int = 0
) -> "torch.nn.Module":
    """Convert a loaded T5ForConditionalGeneration (or mT5) in memory into the shipped GQA class.

    The input model is not modified; weights keep their dtype, merging runs in float32.
    """
    import torch

    from .core import check_groups, convert_layer
    from .methods import get_method
    from .modeling.t5 import modeling_t5_gqa

    with torch.no_grad():
        s_in = t5_shapes(model.config)
        check_groups(num_kv_heads, s_in)
        s_out = Shapes(**{**s_in.__dict__, "num_kv_heads": num_kv_heads})
        merger = get_method(method)
        state = model.state_dict()
        new_state = dict(state)
        for layer in range(s_in.num_layers):
            keys = T5_FAMILY.attention_keys(layer, set(state))
            out, _ = convert_layer(T5_FAMILY, merger, layer, state.__getitem__, keys, s_in, s_out, seed)
            new_state.update({k: v.to(state[k].dtype) for k, v in out.items()})
        config = copy.deepcopy(model.config)
        config.num_key_value_heads = num_kv_heads
        cls = getattr(modeling_t5_gqa, MODEL_CLASSES[config.model_type])
        new = cls(config).to(next(model.parameters()).dtype)
        new.load_state_dict(new_state, strict=True)
        new.generation_config = copy.deepcopy(model.generation_config)
        return new.eval()
