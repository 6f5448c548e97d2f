"""Pre-LN OPT (every size but opt-350m) -> gpt_bigcode. The layers match GPT-2's; q/k/v are stacked per head
into c_attn, and the learned positions lose the two rows OPT offsets them by. opt-350m (post-LN, and a projected
embedding) has no stock class: it needs the shipped-code route. As for gpt2, gpt_bigcode holds H KV heads or one."""

from __future__ import annotations

from functools import partial
from typing import Any

from convert.routes.reexpress import transforms as t
from convert.routes.reexpress.route import Map, Route, common_config

O = "model.decoder.layers.{i}."
B = "transformer.h.{i}."
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reads row position + 2


def _sizes(c: Any) -> dict[str, int]:
    H, D = int(c.num_attention_heads), int(c.hidden_size)
    return dict(H=H, d=D // H, D=D, V=int(c.vocab_size), L=int(c.num_hidden_layers))


def _applies(c: Any) -> bool:
    # opt-350m normalizes after each block and projects its embeddings; neither fits gpt_bigcode.
    return (
        bool(c.do_layer_norm_before)
        and getattr(c, "word_embed_proj_dim", c.hidden_size) == c.hidden_size
        and not getattr(c, "_remove_final_layer_norm", False)
    )


def bigcode_config(c: Any, raw: dict) -> dict:
    return {
        **common_config(c, raw),
        "model_type": "gpt_bigcode",
        "architectures": ["GPTBigCodeForCausalLM"],
        "n_embd": int(c.hidden_size),
        "n_head": int(c.num_attention_heads),
        "n_layer": int(c.num_hidden_layers),
        "n_positions": int(c.max_position_embeddings),
        "n_inner": int(c.ffn_dim),
        "activation_function": c.activation_function,
        "layer_norm_epsilon": 1e-5,  # OPT's nn.LayerNorm default
        "scale_attn_weights": True,
        "multi_query": False,
        "resid_pdrop": float(c.dropout),
        "embd_pdrop": float(c.dropout),
        "attn_pdrop": float(c.attention_dropout),
    }


def _ln(target: str, source: str) -> tuple[Map, Map]:
    # layer_norm_elementwise_affine=false: no weights; gamma = 1, beta = 0 compute the same.
    return (
        Map(target + ".weight", ("?" + source + ".weight",), partial(t.or_ones, "D")),
        Map(target + ".bias", ("?" + source + ".bias",), partial(t.or_zeros, "D")),
    )


def _layer(c: Any) -> tuple[Map, ...]:
    qkv = [O + f"self_attn.{n}_proj." for n in "qkv"]
    return (
        Map(B + "attn.c_attn.weight", tuple(p + "weight" for p in qkv), t.stack_qkv),
        Map(B + "attn.c_attn.bias", tuple("?" + p + "bias" for p in qkv), t.stack_qkv),
        Map(B + "attn.c_proj.weight", (O + "self_attn.out_proj.weight",)),
        Map(B + "attn.c_proj.bias", ("?" + O + "self_attn.out_proj.bias",), partial(t.or_zeros, "D")),
        *_ln(B + "ln_1", O + "self_attn_layer_norm"),
        *_ln(B + "ln_2", O + "final_layer_norm"),
        Map(B + "mlp.c_fc.weight", (O + "fc1.weight",)),
        Map(B + "mlp.c_fc.bias", ("?" + O + "fc1.bias",), partial(t.or_zeros, "I")),
        Map(B + "mlp.c_proj.weight", (O + "fc2.weight",)),
        Map(B + "mlp.c_proj.bias", ("?" + O + "fc2.bias",), partial(t.or_zeros, "D")),
    )


def _global(c: Any) -> tuple[Map, ...]:
    return (
        Map("transformer.wte.weight", ("model.decoder.embed_tokens.weight",)),
        Map(
            "transformer.wpe.weight",
            ("model.decoder.embed_positions.weight",),
            partial(t.drop_rows, POSITION_OFFSET),
        ),
        *_ln("transformer.ln_f", "model.decoder.final_layer_norm"),
        Map("lm_head.weight", ("?lm_head.weight",)),  # absent when tied to the embedding
    )


ROUTE = Route(
    name="opt -> gpt_bigcode",
    source_type="opt",
    target_type="gpt_bigcode",
    applies=_applies,
    target_config=bigcode_config,
    layer_maps=_layer,
    global_maps=_global,
    sizes=lambda c: {**_sizes(c), "I": int(c.ffn_dim)},
    # Some OPT files name keys `decoder.` without the `model.` prefix.
    base_prefix=("model.", r"decoder\."),
    summary="q/k/v stacked per head into c_attn; learned positions without OPT's offset of 2 rows",
)
