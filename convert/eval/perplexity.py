"""Perplexity on fixed token windows: the one quality number every part of gqa-convert reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    window: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> Perplexity:
    """Perplexity of `model` on the 1-D token stream `ids`.

    Windows of `window` tokens start every `stride` tokens (default: `window`, no overlap). With overlap, each
    window scores only the tokens the previous window did not, so every token is scored once, with context.
    """
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    starts = list(range(0, max(len(ids) - window, 0) + 1, stride))
    if len(ids) < window:
        raise ValueError(f"need at least {window} tokens for one window, got {len(ids)}")
    if max_windows is not None:
        starts = starts[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for b in range(0, len(starts), batch_size):
        chunk = starts[b : b + batch_size]
        x = torch.stack([ids[s : s + window] for s in chunk]).to(device)  # [B, T]
        logits = model(input_ids=x).logits.float()  # [B, T, V]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [B, T-1]
        for row, s in enumerate(chunk):
            # With overlap, later windows score only the tokens past the previous window's end.
            first = 0 if s == 0 else max(window - stride - 1, 0)
            total_nll += nll[row, first:].sum().item()
            total_tokens += nll.shape[1] - first
    model.train(was_training)
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, len(starts), window, stride)


def score_folder(
    folder: str | Path,
    ids: torch.Tensor,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    trust_remote_code: bool = False,
) -> Perplexity:
    """Load the checkpoint in `folder` (float32) and score its perplexity on `ids`; the model is freed after."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return perplexity(model, ids, window, max_windows=max_windows, batch_size=batch_size)


def score_text_file(
    folder: str | Path, text_file: str | Path, window: int = 512, windows: int = 12, batch_size: int = 4
) -> Perplexity:
    """Perplexity of `folder` on the first `windows` x `window` + 1 tokens of `text_file`, with its own tokenizer."""
    from transformers import AutoTokenizer

    ids = tokenize_file(AutoTokenizer.from_pretrained(folder), str(text_file), window * windows + 1)
    return score_folder(folder, ids, window, max_windows=windows, batch_size=batch_size)


def tokenize_file(tokenizer, path: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of a whole text file (no special tokens), optionally cut to `max_tokens`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if max_tokens is not None:
        # Tokenizing a 1 MB file is quick, but there is no need: ~8 characters per token is generous.
        text = text[: max_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens is not None else ids
