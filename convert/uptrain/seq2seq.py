"""The two objectives of a run: next-token prediction on decoder-only models, T5's span corruption on
encoder-decoders.

A training row is a tensor of token ids in both cases, so batching, resume and DDP treat them alike:

    causal_lm         [block_size]                      a packed block of text
    span_corruption   [input_length + target_length]    an example's encoder inputs, then its targets

`Task` says how a model scores a batch of rows: its logits, the loss against the rows, the positions a teacher's
distribution is compared at, and the tokens a batch counts in the validation mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from convert.errors import SettingsError, SpanCorruptionError
from convert.text import sources as textdata
from convert.text.span_corruption import corrupt_stream, sentinel_ids
from convert.uptrain.settings import Settings

VALIDATION_SEED = 0  # the validation masks: the same whatever the run's seed, so runs compare on one set


class CausalTask:
    """Next-token prediction on packed blocks [B, T]."""

    def logits(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return model(input_ids=rows).logits  # [B, T, V]

    def loss(self, logits: torch.Tensor, rows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Every position but the last predicts the next token."""
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), rows[:, 1:].flatten(), reduction=reduction
        )

    def scored(self, logits: torch.Tensor) -> torch.Tensor:
        """The positions the loss scores (the last position predicts nothing in the block)."""
        return logits[:, :-1]

    def count(self, rows: torch.Tensor) -> int:
        return rows[:, 1:].numel()


class SpanTask:
    """Span corruption on rows [B, input_length + target_length]: the encoder reads the inputs, the decoder
    reads the targets shifted right (the decoder start token first) and predicts every target token."""

    def __init__(self, input_length: int, decoder_start: int):
        self.input_length, self.decoder_start = input_length, decoder_start

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rows[:, : self.input_length], rows[:, self.input_length :]  # [B, L_in], [B, L_tgt]

    def logits(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        inputs, targets = self.split(rows)
        start = targets.new_full((len(targets), 1), self.decoder_start)
        decoder_inputs = torch.cat([start, targets[:, :-1]], dim=1)  # what the model's own labels= path does
        return model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits  # [B, L_tgt, V]

    def loss(self, logits: torch.Tensor, rows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        targets = self.split(rows)[1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)

    def scored(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def count(self, rows: torch.Tensor) -> int:
        return self.split(rows)[1].numel()


def make_task(s: Settings, config) -> CausalTask | SpanTask:
    if s.objective == "causal_lm":
        return CausalTask()
    start = config.decoder_start_token_id
    if start is None:
        start = config.pad_token_id
    if start is None:
        raise SettingsError(f"{s.model}: config.json has no decoder_start_token_id (T5 uses 0, the pad token)")
    return SpanTask(s.block_size, int(start))


def model_class(s: Settings):
    """The Auto class that loads the model of this objective."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if s.objective == "span_corruption" else AutoModelForCausalLM


def check_objective(s: Settings, config, role: str, path: str) -> None:
    """The objective fits the architecture: span corruption needs an encoder-decoder, causal LM a decoder."""
    kind = getattr(config, "model_type", "?")
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if s.objective == "span_corruption" and not encoder_decoder:
        raise SettingsError(
            f"objective=span_corruption needs an encoder-decoder model (T5, mT5, flan-t5); {role} {path!r} is a "
            f"decoder-only {kind}: use objective=causal_lm"
        )
    if s.objective == "causal_lm" and encoder_decoder:
        raise SettingsError(
            f"objective=causal_lm trains decoder-only models; {role} {path!r} is an encoder-decoder {kind}: "
            f"use objective=span_corruption"
        )


def span_rows(s: Settings, tokenizer, texts: Iterable[str], seed: int, limit: int | None = None) -> torch.Tensor | None:
    """Documents joined with </s>, cut into runs and corrupted: [N, input_length + target_length] (None when the
    text is shorter than one run). Example i draws its spans from (seed, i), so the rows depend on nothing else."""
    span = s.span_corruption
    try:
        sentinels = sentinel_ids(tokenizer, span.num_spans)
    except SpanCorruptionError as e:
        raise SettingsError(f"objective=span_corruption: {e}") from None
    eos = textdata.eos_token_id(tokenizer)
    runs = textdata.pack_blocks(textdata.tokenize_documents(texts, tokenizer), span.raw_length, eos)
    if limit is not None:
        runs = (run for _, run in zip(range(limit), runs, strict=False))
    stream = np.asarray([t for run in runs for t in run], dtype=np.int64)
    if len(stream) < span.raw_length:
        return None
    inputs, targets = corrupt_stream(stream, span, sentinels, eos, seed)
    return torch.from_numpy(np.concatenate([inputs, targets], axis=1))
