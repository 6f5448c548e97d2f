"""GPT-J -> phi. Both run attention and MLP in parallel from one LayerNorm, so the layer maps one to one. GPT-J
rotates interleaved pairs of the first rotary_dim dims of each head; phi rotates them in halves: each q and k head's
rotary rows are permuted. GPT-J has no q/k/v/out biases: phi gets zeros there."""

from __future__ import annotations

from functools import partial
from typing import Any

from convert.routes.reexpress import transforms as t
from convert.routes.reexpress.route import Map, Route, common_config

J = "transformer.h.{i}."
P = "model.layers.{i}."


def _rotary_dim(c: Any) -> int:
    d = int(c.n_embd) // int(c.n_head)
    return int(c.rotary_dim) if c.rotary_dim else d


def _sizes(c: Any) -> dict[str, int]:
    H, D = int(c.n_head), int(c.n_embd)
    return dict(H=H, d=D // H, D=D, V=int(c.vocab_size), L=int(c.n_layer), rotary_dim=_rotary_dim(c), Hd=D)


def phi_config(c: Any, raw: dict) -> dict:
    H, D = int(c.n_head), int(c.n_embd)
    factor = _rotary_dim(c) / (D // H)
    return {
        **common_config(c, raw),
        "model_type": "phi",
        "architectures": ["PhiForCausalLM"],
        "hidden_size": D,
        "intermediate_size": int(c.n_inner or 4 * D),
        "num_hidden_layers": int(c.n_layer),
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "head_dim": D // H,
        "hidden_act": c.activation_function,
        "max_position_embeddings": int(c.n_positions),
        # GPT-J's sinusoids use base 10000 over the rotary dims, as phi's default rope does.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor},
        "partial_rotary_factor": factor,
        "layer_norm_eps": float(c.layer_norm_epsilon),
        "qk_layernorm": False,
        "resid_pdrop": float(c.resid_pdrop),
        "embd_pdrop": float(c.embd_pdrop),
        "attention_dropout": float(c.attn_pdrop),
    }


def _layer(c: Any) -> tuple[Map, ...]:
    return (
        Map(P + "self_attn.q_proj.weight", (J + "attn.q_proj.weight",), t.rotary_half_split),
        Map(P + "self_attn.k_proj.weight", (J + "attn.k_proj.weight",), t.rotary_half_split),
        Map(P + "self_attn.v_proj.weight", (J + "attn.v_proj.weight",)),
        Map(P + "self_attn.q_proj.bias", (), partial(t.zeros, "Hd")),
        Map(P + "self_attn.k_proj.bias", (), partial(t.zeros, "Hd")),
        Map(P + "self_attn.v_proj.bias", (), partial(t.zeros, "Hd")),
        Map(P + "self_attn.dense.weight", (J + "attn.out_proj.weight",)),
        Map(P + "self_attn.dense.bias", (), partial(t.zeros, "D")),
        Map(P + "input_layernorm.weight", (J + "ln_1.weight",)),
        Map(P + "input_layernorm.bias", (J + "ln_1.bias",)),
        Map(P + "mlp.fc1.weight", (J + "mlp.fc_in.weight",)),
        Map(P + "mlp.fc1.bias", (J + "mlp.fc_in.bias",)),
        Map(P + "mlp.fc2.weight", (J + "mlp.fc_out.weight",)),
        Map(P + "mlp.fc2.bias", (J + "mlp.fc_out.bias",)),
    )


def _global(c: Any) -> tuple[Map, ...]:
    return (
        Map("model.embed_tokens.weight", ("transformer.wte.weight",)),
        Map("model.final_layernorm.weight", ("transformer.ln_f.weight",)),
        Map("model.final_layernorm.bias", ("transformer.ln_f.bias",)),
        Map("lm_head.weight", ("?lm_head.weight",)),
        Map("lm_head.bias", ("?lm_head.bias",), partial(t.or_zeros, "V")),
    )


ROUTE = Route(
    name="gptj -> phi",
    source_type="gptj",
    target_type="phi",
    applies=lambda c: True,
    target_config=phi_config,
    layer_maps=_layer,
    global_maps=_global,
    sizes=_sizes,
    ignore={
        r"\.attn\.(bias|masked_bias)$": "causal-mask buffers, rebuilt by the target class",
        r"embed_positions$": "rotary sinusoids, recomputed from the config",
    },
    summary="interleaved rotary rows of every q and k head permuted to phi's half-split layout",
)
