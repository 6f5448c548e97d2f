"""The run's text: documents of the training and validation parts, packed into blocks, and batches by step.

The order of the training blocks is a pure function of (seed, step), so a resumed run reads exactly the batches
an uninterrupted run would have read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from convert.errors import SettingsError
from convert.text import sources as textdata
from convert.uptrain.seq2seq import VALIDATION_SEED, span_rows
from convert.uptrain.settings import Settings


def separate_validation(s: Settings) -> bool:
    """Whether validation has its own source or split (else it is carved out of the training documents)."""
    return s.validation is not None or s.validation_split is not None


def load_documents(s: Settings, part: str) -> tuple[Callable[[], Iterator[str]], str, Callable[[], Any]]:
    """The documents of the training or the validation part, as a fresh iterator each call."""
    separate = separate_validation(s)
    if part == "validation" and separate:
        source = s.validation if s.validation is not None else s.data
        split = s.validation_split if s.validation_split is not None else s.data_split
    else:
        source, split = s.data, s.data_split

    def open_dataset():
        return textdata.load_text_dataset(
            source,
            config=s.data_config,
            split=split,
            text_column=s.text_column,
            streaming=s.streaming,
            txt_documents=s.txt_documents,
        )

    ds = open_dataset()

    def texts() -> Iterator[str]:
        stream = textdata.iter_texts(ds)
        if not separate:  # carve the held-out documents out of the training source
            stream = textdata.carve(stream, s.validation_fraction, part)
        return stream

    name = textdata.describe_source(source, s.data_config, split)
    if part == "validation" and not separate:
        name = f"{s.validation_fraction:g} of the documents of {name}, held out"
    return texts, name, open_dataset


def prepare_data(s: Settings, tokenizer) -> dict:
    """Training blocks (all in memory, or a stream), validation blocks, and what the plan reports about them."""
    if s.objective == "span_corruption":
        return prepare_span_data(s, tokenizer)
    eos = textdata.eos_token_id(tokenizer)
    train_texts, train_name, open_train = load_documents(s, "train")
    data: dict[str, Any] = {"train_name": train_name, "eos": eos, "tokenizer": tokenizer}
    if s.streaming:  # look at the first block only; training packs the stream as it goes
        tokens = textdata.tokenize_documents(train_texts(), tokenizer)
        first = next(textdata.pack_blocks(tokens, s.block_size, eos), None)
        if first is None:
            raise SettingsError(f"training data {train_name} holds fewer tokens than one block ({s.block_size})")
        data.update(
            train_blocks=None,
            open_train=open_train,
            train_tokens=None,
            holdout=0.0 if separate_validation(s) else s.validation_fraction,
        )
    else:
        docs = list(train_texts())
        if not docs:
            raise SettingsError(f"training data {train_name} holds no text")
        blocks = list(textdata.pack_blocks(textdata.tokenize_documents(docs, tokenizer), s.block_size, eos))
        if not blocks:
            tokens = textdata.count_tokens(docs, tokenizer)
            raise SettingsError(
                f"training data {train_name} holds {tokens} tokens, fewer than one block ({s.block_size}): "
                f"give more text or lower block_size"
            )
        data.update(train_blocks=torch.tensor(blocks, dtype=torch.long), train_documents=len(docs))
        data["train_tokens"] = data["train_blocks"].numel()

    data["val_blocks"] = None
    if separate_validation(s) or s.validation_fraction > 0:
        val_texts, val_name, _ = load_documents(s, "validation")
        stream = textdata.pack_blocks(textdata.tokenize_documents(val_texts(), tokenizer), s.block_size, eos)
        val = list(itertools.islice(stream, s.max_eval_blocks))
        if not val:
            raise SettingsError(
                f"validation data {val_name} (validation_fraction={s.validation_fraction}) holds fewer tokens than "
                f"one block ({s.block_size}): raise validation_fraction, give a validation source, or lower block_size"
            )
        data.update(val_blocks=torch.tensor(val, dtype=torch.long), val_name=val_name)
    return data


def prepare_span_data(s: Settings, tokenizer) -> dict:
    """`prepare_data` for span corruption: rows of inputs + targets (seq2seq.span_rows), training and validation."""

    span = s.span_corruption
    train_texts, train_name, _ = load_documents(s, "train")
    docs = list(train_texts())
    rows = span_rows(s, tokenizer, docs, s.seed)
    if rows is None:
        raise SettingsError(
            f"training data {train_name} holds {textdata.count_tokens(docs, tokenizer)} tokens, fewer than one "
            f"span-corruption example needs ({span.raw_length} for block_size={s.block_size}): give more text or "
            f"lower block_size"
        )
    data: dict[str, Any] = {"train_name": train_name, "tokenizer": tokenizer, "train_blocks": rows}
    data.update(train_documents=len(docs), train_tokens=rows.numel(), val_blocks=None)
    if separate_validation(s) or s.validation_fraction > 0:
        val_texts, val_name, _ = load_documents(s, "validation")
        val = span_rows(s, tokenizer, val_texts(), VALIDATION_SEED, limit=s.max_eval_blocks)
        if val is None:
            raise SettingsError(
                f"validation data {val_name} (validation_fraction={s.validation_fraction}) holds fewer tokens than "
                f"one span-corruption example ({span.raw_length}): raise validation_fraction, give a validation "
                f"source, or lower block_size"
            )
        data.update(val_blocks=val, val_name=val_name)
    return data


def open_stream(s: Settings, data: dict, state: dict | None) -> textdata.PackedStream:
    """The streamed training corpus, at the position a checkpoint stored (or at its start)."""
    return textdata.PackedStream(
        data["open_train"], data["tokenizer"], s.block_size, s.shuffle_buffer, s.seed, data["holdout"], state=state
    )


def global_batches(s: Settings, data: dict, global_batch: int, start_step: int) -> Iterator[torch.Tensor]:
    """Global batches of `global_batch` blocks from `start_step` on; the same on every process.

    In memory: each epoch visits the blocks in a permutation seeded by (seed, epoch), so the batch of a step
    depends on nothing but the step. Streaming: `data["stream"]`, a `PackedStream` (seeded shuffle buffer,
    packing on the fly) that a checkpoint stores the position of, so a resumed run reads on from there.
    """
    if data["train_blocks"] is not None:
        blocks = data["train_blocks"]
        n = len(blocks)
        orders: dict[int, torch.Tensor] = {}
        for step in itertools.count(start_step):
            rows = []
            for g in range(step * global_batch, (step + 1) * global_batch):
                epoch = g // n
                if epoch not in orders:
                    orders.clear()
                    orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 100_003 + epoch))
                rows.append(orders[epoch][g % n])
            yield blocks[torch.stack(rows)]
        return

    blocks = data["stream"].blocks()
    while True:
        yield torch.tensor([next(blocks) for _ in range(global_batch)], dtype=torch.long)
