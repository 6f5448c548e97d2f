"""Shared test helpers (t5)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSeq2SeqLM

H, D_KV, DEC_LAYERS = 4, 8, 2
KINDS = {
    # d_model / heads = 6 differs from d_kv = 8: head_dim must come from d_kv
    "t5": dict(model_type="t5", feed_forward_proj="relu"),
    "t5.1.1": dict(model_type="t5", feed_forward_proj="gated-gelu", untied=True),
    "mt5": dict(model_type="mt5", feed_forward_proj="gated-gelu", untied=True),
}


def tiny_t5(kind: str, seed: int = 0) -> torch.nn.Module:
    spec = dict(KINDS[kind])
    untied = spec.pop("untied", False)
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=96,
        d_model=24,
        d_kv=D_KV,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=DEC_LAYERS,
        num_heads=H,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=not untied,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # unit norms would hide a swapped norm
                p.add_(torch.randn_like(p) * 0.3)
        if untied:  # published T5.1.1 checkpoints carry their own output head
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model.eval()


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    if model.lm_head.weight is not model.shared.weight:  # transformers saves T5 tied; write the head as published
        weights = load_file(folder / "model.safetensors")
        weights["lm_head.weight"] = model.lm_head.weight.detach().clone()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    return folder
