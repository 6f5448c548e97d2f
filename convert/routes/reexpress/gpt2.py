"""GPT-2 (gpt2, distilgpt2) -> gpt_bigcode. gpt_bigcode is GPT-2 with nn.Linear instead of Conv1D and a
multi_query flag: Conv1D weights are transposed and c_attn's [q heads | k heads | v heads] rows become
gpt_bigcode's per-head [H, 3, d]. gpt_bigcode holds H KV heads (multi_query false) or one (true), so this route
serves G = H (re-expression only) and G = 1; 1 < G < H needs the shipped-code route."""

from __future__ import annotations

from typing import Any

from convert.routes.reexpress import transforms as t
from convert.routes.reexpress.route import Map, Route, common_config

B = "transformer.h.{i}."


def _sizes(c: Any) -> dict[str, int]:
    H, D = int(c.n_head), int(c.n_embd)
    return dict(H=H, d=D // H, D=D, V=int(c.vocab_size), L=int(c.n_layer))


def _applies(c: Any) -> bool:
    # gpt_bigcode has neither per-layer attention scaling nor cross-attention.
    return not getattr(c, "scale_attn_by_inverse_layer_idx", False) and not getattr(c, "add_cross_attention", False)


def bigcode_config(c: Any, raw: dict) -> dict:
    return {
        **common_config(c, raw),
        "model_type": "gpt_bigcode",
        "architectures": ["GPTBigCodeForCausalLM"],
        "n_embd": int(c.n_embd),
        "n_head": int(c.n_head),
        "n_layer": int(c.n_layer),
        "n_positions": int(c.n_positions),
        "n_inner": c.n_inner,
        "activation_function": c.activation_function,
        "layer_norm_epsilon": float(c.layer_norm_epsilon),
        "scale_attn_weights": bool(c.scale_attn_weights),
        "multi_query": False,
        "resid_pdrop": float(c.resid_pdrop),
        "embd_pdrop": float(c.embd_pdrop),
        "attn_pdrop": float(c.attn_pdrop),
    }


def _layer(c: Any) -> tuple[Map, ...]:
    return (
        Map(B + "attn.c_attn.weight", (B + "attn.c_attn.weight",), t.conv1d_qkv),
        Map(B + "attn.c_attn.bias", (B + "attn.c_attn.bias",), t.interleave_qkv),
        Map(B + "attn.c_proj.weight", (B + "attn.c_proj.weight",), t.transpose),
        Map(B + "attn.c_proj.bias", (B + "attn.c_proj.bias",)),
        Map(B + "ln_1.weight", (B + "ln_1.weight",)),
        Map(B + "ln_1.bias", (B + "ln_1.bias",)),
        Map(B + "ln_2.weight", (B + "ln_2.weight",)),
        Map(B + "ln_2.bias", (B + "ln_2.bias",)),
        Map(B + "mlp.c_fc.weight", (B + "mlp.c_fc.weight",), t.transpose),
        Map(B + "mlp.c_fc.bias", (B + "mlp.c_fc.bias",)),
        Map(B + "mlp.c_proj.weight", (B + "mlp.c_proj.weight",), t.transpose),
        Map(B + "mlp.c_proj.bias", (B + "mlp.c_proj.bias",)),
    )


def _global(c: Any) -> tuple[Map, ...]:
    return (
        Map("transformer.wte.weight", ("transformer.wte.weight",)),
        Map("transformer.wpe.weight", ("transformer.wpe.weight",)),
        Map("transformer.ln_f.weight", ("transformer.ln_f.weight",)),
        Map("transformer.ln_f.bias", ("transformer.ln_f.bias",)),
        Map("lm_head.weight", ("?lm_head.weight",)),  # absent when tied to wte
    )


ROUTE = Route(
    name="gpt2 -> gpt_bigcode",
    source_type="gpt2",
    target_type="gpt_bigcode",
    applies=_applies,
    target_config=bigcode_config,
    layer_maps=_layer,
    global_maps=_global,
    sizes=_sizes,
    ignore={r"\.attn\.(bias|masked_bias)$": "causal-mask buffers, rebuilt by the target class"},
    # The hub's gpt2 and distilgpt2 files name keys without the `transformer.` prefix.
    base_prefix=("transformer.", r"(h\.\d+\.|wte\.|wpe\.|ln_f\.)"),
    summary="Conv1D weights transposed; c_attn rows regrouped per head",
)
