"""The serving lane's routes: one tiny source per route, the G it is converted to, the class vLLM should get.

Shapes: H = 4 query heads of d = 32 (vLLM's CPU attention needs d >= 32), 2 layers, vocabulary 320 (not equal to
any position table, so vLLM's backend never takes a position embedding for the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

H = 4
D = 32
HIDDEN = H * D
LAYERS = 2
VOCAB = 320
POSITIONS = 256


@dataclass(frozen=True)
class Route:
    name: str
    model_type: str  # the source's
    config: dict  # what the source needs beyond the shared sizes
    num_kv_heads: int  # G after conversion
    output_model_type: str  # what the converter writes
    shipped: bool = False  # modeling code shipped with the output (--write-modeling-code)
    positions_key: str = "max_position_embeddings"
    heads: int = H  # query heads of the source (H)
    extra: dict = field(default_factory=dict)


def _decoder(**kw) -> dict:
    return dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=H, **kw)


ROUTES = [
    Route("llama", "llama", _decoder(intermediate_size=192, num_key_value_heads=H), 2, "llama"),
    Route("qwen2", "qwen2", _decoder(intermediate_size=192, num_key_value_heads=H), 1, "qwen2"),
    Route(
        "neox-parallel-phi",
        "gpt_neox",
        _decoder(intermediate_size=192, use_parallel_residual=True, rotary_pct=0.5),
        2,
        "phi",
    ),
    Route(
        "gptj-phi",
        "gptj",
        dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=H, n_inner=192, rotary_dim=16),
        2,
        "phi",
        positions_key="n_positions",
    ),
    Route(
        "neox-sequential-nemotron",
        "gpt_neox",
        _decoder(intermediate_size=192, use_parallel_residual=False, rotary_pct=0.5),
        2,
        "nemotron",
    ),
    Route(
        "falcon",
        "falcon",
        _decoder(new_decoder_architecture=True, num_kv_heads=H, parallel_attn=True, alibi=False, bias=True),
        2,
        "falcon",
    ),
    Route(
        "gpt2-bigcode",
        "gpt2",
        dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=H, n_inner=192),
        1,
        "gpt_bigcode",
        positions_key="n_positions",
    ),
    Route("opt-bigcode", "opt", _decoder(ffn_dim=192, word_embed_proj_dim=HIDDEN), 1, "gpt_bigcode"),
    Route(
        "gpt2-shipped",
        "gpt2",
        dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=H, n_inner=192),
        2,
        "gqa_gpt2",
        shipped=True,
        positions_key="n_positions",
    ),
    Route("opt-shipped", "opt", _decoder(ffn_dim=192, word_embed_proj_dim=HIDDEN), 2, "gqa_opt", shipped=True),
    Route(
        "bloom-shipped",
        "bloom",
        dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=H),
        2,
        "gqa_bloom",
        shipped=True,
        positions_key="",
    ),
    # 6 heads: ALiBi slopes of a head count that is not a power of 2 (interleaved, as in bloom-176b's 112 heads)
    Route(
        "bloom-shipped-6-heads",
        "bloom",
        dict(hidden_size=6 * D, n_layer=LAYERS, n_head=6),
        3,
        "gqa_bloom",
        shipped=True,
        positions_key="",
        heads=6,
    ),
    Route(
        "mpt-shipped",
        "mpt",
        dict(d_model=HIDDEN, n_layers=LAYERS, n_heads=H, expansion_ratio=2),
        2,
        "gqa_mpt",
        shipped=True,
        positions_key="max_seq_len",
    ),
]
BY_NAME = {r.name: r for r in ROUTES}
