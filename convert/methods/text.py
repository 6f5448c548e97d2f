"""Calibration text: token ids for calibrated merging, from the builtin text, random ids, or any data source."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor

from convert.errors import ConversionError, DataError
from convert.text.builtin import builtin_text
from convert.text.sources import describe_source, sample_token_ids

BUILTIN = "builtin"  # Python's own pydoc topics text: offline, ships with every Python
RANDOM = "random"  # uniform random token ids: no tokenizer needed (tests, data-free smoke runs)


def calibration_ids(
    folder: Path | None, data: str | None, n_tokens: int, seq_len: int, seed: int, vocab_size: int
) -> tuple[Tensor, str]:
    """[B, T] token ids (B*T <= n_tokens, T <= seq_len) and a description of where they came from.

    data: None or "builtin" (Python's pydoc topics text, offline), "random" (uniform random ids, no tokenizer),
    or any source `convert.text.sources` reads: local .txt/.jsonl/.json/.parquet files (path or glob) or a hub dataset.
    """
    if n_tokens < 2:
        raise ConversionError(f"--calibration-tokens must be at least 2, got {n_tokens}")
    T = min(seq_len, n_tokens)
    B = n_tokens // T
    total = B * T
    data = data or BUILTIN
    if data == RANDOM:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (B, T), generator=gen), f"random token ids (seed {seed})"
    tokenizer = _tokenizer(folder)
    if data == BUILTIN:
        ids = tokenizer(builtin_calibration_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
        return _windows(
            ids, B, T, seed, "the builtin calibration text"
        ), f"builtin: pydoc topics, first half (seed {seed})"

    try:
        ids_t = sample_token_ids(data, tokenizer, total, seed)
        where = describe_source(data)
    except DataError as e:
        raise ConversionError(f"--calibration-data {data}: {e}") from None
    return ids_t.reshape(B, T), f"{where} (seed {seed})"


def builtin_calibration_text() -> str:
    """Python's pydoc topic pages, first half by name: the half `gqa-convert eval` does not score."""

    return builtin_text("calibration")


def _windows(ids: Tensor, B: int, T: int, seed: int, what: str) -> Tensor:
    """B windows of T tokens, chosen by seed among the non-overlapping windows of `ids`, in text order."""
    slots = len(ids) // T
    if slots < B:
        raise ConversionError(f"{what} has {len(ids)} tokens, fewer than the {B * T} asked for calibration")
    chosen = sorted(random.Random(seed).sample(range(slots), B))
    return torch.stack([ids[s * T : (s + 1) * T] for s in chosen])


def _tokenizer(folder: Path | None):
    from transformers import AutoTokenizer

    if folder is None:
        raise ConversionError("calibration text needs the model's tokenizer; use --calibration-data random")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds (missing files, bad json)
        raise ConversionError(
            f"could not load the tokenizer from {folder} ({type(e).__name__}: {e}); calibration text needs it. "
            "Put the tokenizer files beside the weights, or use --calibration-data random"
        ) from None
