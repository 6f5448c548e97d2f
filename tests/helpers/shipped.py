"""Shared test helpers (shipped)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

H = 8

SMALL = dict(vocab_size=160, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=H, n_positions=64),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=H, ffn_dim=96, max_position_embeddings=64),
    # opt-350m: post-LN and a narrower embedding projected in and out
    "opt-post-ln": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=H,
        ffn_dim=96,
        max_position_embeddings=64,
        do_layer_norm_before=False,
        word_embed_proj_dim=32,
    ),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=H),
    "mpt": dict(d_model=64, n_heads=H, n_layers=2, max_seq_len=64, expansion_ratio=2),
}

SDPA = ("gpt2", "opt", "opt-post-ln", "bloom")  # stock mpt (whose model builds the mask) is eager only


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind.split("-")[0], **SMALL, **CONFIGS[kind])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # larger biases and norms than the init make every difference visible in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 160, (batch, length), generator=torch.Generator().manual_seed(seed))


def load(folder: Path, impl: str = "eager") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation=impl).eval()
