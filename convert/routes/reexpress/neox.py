"""GPT-NeoX (Pythia, gpt-neox-20b): parallel residual -> phi, sequential residual -> nemotron.

Both targets rotate the leading rotary dims of each head in halves, as NeoX does, so only the layout changes:
`query_key_value` rows [H, 3, d] are un-fused into q/k/v projections.

- phi has one LayerNorm feeding attention and MLP; NeoX's parallel layer has two. Each is folded into the
  projections that read it (W diag(gamma), b + W beta), and phi's LayerNorm becomes gamma = 1, beta = 0.
- nemotron's layer is NeoX's sequential one; its LayerNorm1P stores gamma - 1.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from convert.routes.reexpress import transforms as t
from convert.routes.reexpress.route import Map, Route, common_config

NX = "gpt_neox.layers.{i}."
QKV = NX + "attention.query_key_value."
LN1, LN2 = NX + "input_layernorm.", NX + "post_attention_layernorm."
PHI = "model.layers.{i}."
NEMO = "model.layers.{i}."


def _sizes(c: Any) -> dict[str, int]:
    H, D = int(c.num_attention_heads), int(c.hidden_size)
    return dict(H=H, d=D // H, D=D, V=int(c.vocab_size), L=int(c.num_hidden_layers), I=int(c.intermediate_size))


def _rope(c: Any) -> dict:
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", float(getattr(c, "rotary_emb_base", 10000.0)))
    rope.setdefault("partial_rotary_factor", float(getattr(c, "rotary_pct", 0.25)))
    return rope


def _shared(c: Any, raw: dict) -> dict:
    H, D = int(c.num_attention_heads), int(c.hidden_size)
    return {
        **common_config(c, raw),
        "hidden_size": D,
        "intermediate_size": int(c.intermediate_size),
        "num_hidden_layers": int(c.num_hidden_layers),
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "head_dim": D // H,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": int(c.max_position_embeddings),
        "rope_parameters": _rope(c),
        "attention_dropout": float(getattr(c, "attention_dropout", 0.0) or 0.0),
    }


def phi_config(c: Any, raw: dict) -> dict:
    return {
        **_shared(c, raw),
        "model_type": "phi",
        "architectures": ["PhiForCausalLM"],
        "layer_norm_eps": float(c.layer_norm_eps),
        "partial_rotary_factor": _rope(c)["partial_rotary_factor"],
        "qk_layernorm": False,
        "resid_pdrop": float(getattr(c, "hidden_dropout", 0.0) or 0.0),
        "embd_pdrop": float(getattr(c, "hidden_dropout", 0.0) or 0.0),
    }


def nemotron_config(c: Any, raw: dict) -> dict:
    return {
        **_shared(c, raw),
        "model_type": "nemotron",
        "architectures": ["NemotronForCausalLM"],
        "norm_eps": float(c.layer_norm_eps),
        "partial_rotary_factor": _rope(c)["partial_rotary_factor"],
        "attention_bias": bool(getattr(c, "attention_bias", True)),
        "mlp_bias": True,
    }


def _phi_layer(c: Any) -> tuple[Map, ...]:
    rows = []
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows += [
            Map(f"{PHI}self_attn.{name}.weight", (QKV + "weight", LN1 + "weight"), partial(t.neox_q_folded, part)),
            Map(
                f"{PHI}self_attn.{name}.bias",
                ("?" + QKV + "bias", QKV + "weight", LN1 + "bias"),
                partial(t.neox_b_folded, part),
            ),
        ]
    return (
        *rows,
        Map(PHI + "self_attn.dense.weight", (NX + "attention.dense.weight",)),
        Map(PHI + "self_attn.dense.bias", ("?" + NX + "attention.dense.bias",), partial(t.or_zeros, "D")),
        Map(PHI + "mlp.fc1.weight", (NX + "mlp.dense_h_to_4h.weight", LN2 + "weight"), t.linear_folded),
        Map(
            PHI + "mlp.fc1.bias",
            (NX + "mlp.dense_h_to_4h.bias", NX + "mlp.dense_h_to_4h.weight", LN2 + "bias"),
            t.bias_folded,
        ),
        Map(PHI + "mlp.fc2.weight", (NX + "mlp.dense_4h_to_h.weight",)),
        Map(PHI + "mlp.fc2.bias", (NX + "mlp.dense_4h_to_h.bias",)),
        # Both LayerNorms now live in the projections: phi's one LayerNorm only normalizes.
        Map(PHI + "input_layernorm.weight", (), partial(t.ones, "D")),
        Map(PHI + "input_layernorm.bias", (), partial(t.zeros, "D")),
    )


def _phi_global(c: Any) -> tuple[Map, ...]:
    return (
        Map("model.embed_tokens.weight", ("gpt_neox.embed_in.weight",)),
        Map("model.final_layernorm.weight", ("gpt_neox.final_layer_norm.weight",)),
        Map("model.final_layernorm.bias", ("gpt_neox.final_layer_norm.bias",)),
        Map("lm_head.weight", ("?embed_out.weight",)),  # absent when tied to the embedding
        Map("lm_head.bias", (), partial(t.zeros, "V")),
    )


def _nemotron_layer(c: Any) -> tuple[Map, ...]:
    bias = bool(getattr(c, "attention_bias", True))
    rows = []
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows.append(Map(f"{NEMO}self_attn.{name}.weight", (QKV + "weight",), partial(t.neox_part, part)))
        if bias:
            rows.append(Map(f"{NEMO}self_attn.{name}.bias", (QKV + "bias",), partial(t.neox_part, part)))
    if bias:
        rows.append(Map(NEMO + "self_attn.o_proj.bias", (NX + "attention.dense.bias",)))
    return (
        *rows,
        Map(NEMO + "self_attn.o_proj.weight", (NX + "attention.dense.weight",)),
        Map(NEMO + "input_layernorm.weight", (LN1 + "weight",), t.minus_one),
        Map(NEMO + "input_layernorm.bias", (LN1 + "bias",)),
        Map(NEMO + "post_attention_layernorm.weight", (LN2 + "weight",), t.minus_one),
        Map(NEMO + "post_attention_layernorm.bias", (LN2 + "bias",)),
        Map(NEMO + "mlp.up_proj.weight", (NX + "mlp.dense_h_to_4h.weight",)),
        Map(NEMO + "mlp.up_proj.bias", (NX + "mlp.dense_h_to_4h.bias",)),
        Map(NEMO + "mlp.down_proj.weight", (NX + "mlp.dense_4h_to_h.weight",)),
        Map(NEMO + "mlp.down_proj.bias", (NX + "mlp.dense_4h_to_h.bias",)),
    )


def _nemotron_global(c: Any) -> tuple[Map, ...]:
    return (
        Map("model.embed_tokens.weight", ("gpt_neox.embed_in.weight",)),
        Map("model.norm.weight", ("gpt_neox.final_layer_norm.weight",), t.minus_one),
        Map("model.norm.bias", ("gpt_neox.final_layer_norm.bias",)),
        Map("lm_head.weight", ("?embed_out.weight",)),
    )


# Older Pythia checkpoints carry the causal mask and rotary frequencies as saved buffers.
IGNORE = {
    r"\.attention\.(bias|masked_bias)$": "causal-mask buffers, rebuilt by the target class",
    r"rotary_emb\.inv_freq$": "rotary frequencies, recomputed from the config",
}

ROUTES = (
    Route(
        name="gpt_neox -> phi",
        source_type="gpt_neox",
        target_type="phi",
        applies=lambda c: bool(c.use_parallel_residual),
        target_config=phi_config,
        layer_maps=_phi_layer,
        global_maps=_phi_global,
        sizes=_sizes,
        ignore=IGNORE,
        summary="query_key_value un-fused; both parallel LayerNorms folded into the projections that read them",
    ),
    Route(
        name="gpt_neox -> nemotron",
        source_type="gpt_neox",
        target_type="nemotron",
        applies=lambda c: not c.use_parallel_residual,
        target_config=nemotron_config,
        layer_maps=_nemotron_layer,
        global_maps=_nemotron_global,
        sizes=_sizes,
        ignore=IGNORE,
        summary="query_key_value un-fused; LayerNorm weights stored as gamma - 1 (LayerNorm1P)",
    ),
)
