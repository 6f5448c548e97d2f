"""Tiny random models of every supported family, built from configs and saved as real safetensors shards."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from convert.families import family_for

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=160,
    max_position_embeddings=256,
    head_dim=8,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
# Only what a family needs beyond BASE to build small and to exercise its special case.
EXTRA: dict[str, dict] = {
    "qwen2": dict(),  # k/v biases come with the architecture
    "qwen3": dict(),  # q/k norms
    "gemma": dict(head_dim=16),  # head_dim is not hidden / heads
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16, sliding_window=16),
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": dict(
        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32),
    "olmoe": dict(num_experts=2, num_experts_per_tok=1),
    "granitemoe": dict(num_local_experts=2, num_experts_per_tok=1),
    "phi": dict(partial_rotary_factor=0.5),  # partial rotary, biases everywhere
    "stablelm": dict(partial_rotary_factor=0.25, use_qkv_bias=True),
    "phi3": dict(),  # fused qkv_proj
    "starcoder2": dict(use_bias=True),
    "cohere": dict(use_qk_norm=True),  # one norm weight per head
    "nemotron": dict(partial_rotary_factor=0.5),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=4, parallel_attn=True, alibi=False, bias=True),
    "seed_oss": dict(attention_bias=True),
    "gpt_bigcode": dict(multi_query=False),  # MHA: per-head [q, k, v] rows in c_attn
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**BASE, **EXTRA.get(model_type, {}), **overrides}
    if model_type == "falcon":
        kwargs.pop("num_key_value_heads", None)
        kwargs.pop("intermediate_size", None)
        kwargs.setdefault("ffn_hidden_size", 96)
    if model_type in ("olmo", "phi", "stablelm", "starcoder2", "falcon", "nemotron", "gpt_bigcode"):
        kwargs.pop("head_dim", None)  # these derive head_dim from hidden / heads
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init gives tiny norm and bias values; larger ones make every difference visible in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def save(model: torch.nn.Module, folder: Path, shard: str = "150KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def make_groups_identical(model: torch.nn.Module, groups: int) -> None:
    """Overwrite every KV head with the first head of its contiguous group, so pooling loses nothing."""
    from convert.families import shapes_for

    family = family_for(model.config.model_type)
    s = shapes_for(family, model.config)
    state = model.state_dict()
    n = s.num_kv_heads // groups
    with torch.no_grad():
        for layer in range(s.num_layers):
            keys = family.attention_keys(layer, set(state))
            att = family.split(layer, state.__getitem__, keys, s)
            same = {
                a: getattr(att, a)[::n].repeat_interleave(n, 0)
                for a in ("k", "v", "k_bias", "v_bias", "k_norm")
                if getattr(att, a) is not None
            }
            for key, t in family.join(layer, att.replace(**same), keys, s).items():
                state[key].copy_(t.to(state[key].dtype))


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits
