"""The run's text: each source's documents, tokenized once into the on-disk cache (or streamed), validation
blocks, and what the plan reports about them. `loader.py` turns this into the rows of each step.

In memory, every process reads the token cache (`token_cache.py`), tokenizing only its part of a source when the
cache misses; streaming, every process packs only its part of the stream (`loader.StreamBatches`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from convert.errors import DataError, SettingsError
from convert.text import sources as textdata
from convert.uptrain import mixture, token_cache
from convert.uptrain.loader import Rows, StepBatches, StreamBatches
from convert.uptrain.mixture import SourceSpec
from convert.uptrain.seq2seq import VALIDATION_SEED, span_rows
from convert.uptrain.settings import Settings


def separate_validation(s: Settings) -> bool:
    """Whether validation has its own source or split (else it is carved out of the training documents)."""
    return s.validation is not None or s.validation_split is not None


def _where(specs: list[SourceSpec], k: int) -> str:
    return f"data[{k}] ({specs[k].describe()}): " if len(specs) > 1 else ""


def open_source(s: Settings, spec: SourceSpec, streaming: bool):
    """`load_text_dataset` of one source."""
    return textdata.load_text_dataset(
        spec.source,
        config=spec.config,
        split=spec.split,
        text_column=spec.text_column,
        streaming=streaming,
        txt_documents=s.txt_documents,
    )


@contextlib.contextmanager
def naming(specs: list[SourceSpec], k: int):
    """A mixture's data errors name the entry, and where to fix a text column."""
    try:
        yield
    except DataError as e:
        if len(specs) == 1:
            raise
        fix = " (on that entry of data:)" if "text_column" in str(e) else ""
        raise DataError(f"{_where(specs, k)}{e}{fix}") from None


def load_documents(
    s: Settings, part: str, spec: SourceSpec | None = None, lazy: bool = False
) -> tuple[Callable[[], Iterator[str]], str, Callable[[], Any]]:
    """The documents of the training or the validation part of one source, as a fresh iterator each call."""
    spec = spec or mixture.source_specs(s)[0]
    separate = separate_validation(s)
    if part == "validation" and separate:
        source = s.validation if s.validation is not None else spec.source
        split = s.validation_split if s.validation_split is not None else spec.split
        spec = SourceSpec(source, 1.0, spec.config, split, spec.text_column)

    def open_dataset():
        return open_source(s, spec, s.streaming)

    ds = None if lazy else open_dataset()  # lazy: only the name is wanted (the token cache may hit)

    def texts() -> Iterator[str]:
        stream = textdata.iter_texts(ds if ds is not None else open_dataset())
        if not separate:  # carve the held-out documents out of the training source
            stream = textdata.carve(stream, s.validation_fraction, part)
        return stream

    name = spec.describe()
    if part == "validation" and not separate:
        name = f"{s.validation_fraction:g} of the documents of {name}, held out"
    return texts, name, open_dataset


def _documents_for_cache(s: Settings, spec: SourceSpec, ds, part: str = "train"):
    """The training (or held-out) documents of an in-memory source as a `datasets.Dataset`: blank ones dropped,
    carved by position (the same documents `iter_texts` + `carve` give)."""

    def nonblank(batch: dict) -> list[bool]:
        keep = []
        for text in batch["text"]:
            if text is not None and not isinstance(text, str):
                raise DataError(f"the text column holds {type(text).__name__} values, not strings")
            keep.append(bool(text and text.strip()))
        return keep

    docs = ds.filter(nonblank, batched=True, desc=None)
    if not separate_validation(s) and s.validation_fraction > 0:
        fraction, want = s.validation_fraction, part == "validation"
        docs = docs.filter(
            lambda _, idx: [textdata.held_out(i, fraction) == want for i in idx], with_indices=True, batched=True
        )
    return docs


def cache_key(s: Settings, spec: SourceSpec, tokenizer, fingerprint: Any, part: str = "train") -> dict:
    """What decides a source's packed token stream (see token_cache.py: not the block size)."""
    return {
        "format": token_cache.FORMAT,
        "part": part,
        "source": spec.source,
        "fingerprint": fingerprint,
        "config": spec.config,
        "split": spec.split,
        "text_column": spec.text_column,
        "txt_documents": s.txt_documents,
        "held_out": 0.0 if separate_validation(s) else s.validation_fraction,
        "tokenizer": token_cache.tokenizer_digest(tokenizer),
    }


def cached_source(s: Settings, spec: SourceSpec, tokenizer, rank: int, world: int, part: str = "train"):
    """One in-memory source (its training or held-out documents) through the token cache: hit, or this process's
    share tokenized (and the others' waited for)."""
    files = textdata.local_files(spec.source)
    ds = None
    if files is not None:
        fingerprint: Any = token_cache.files_fingerprint(files)
    else:  # a hub or folder dataset: datasets fingerprints its prepared Arrow files
        ds = open_source(s, spec, False)
        fingerprint = ds._fingerprint

    def open_docs():
        return _documents_for_cache(s, spec, ds if ds is not None else open_source(s, spec, False), part)

    root = Path(s.data_cache) if s.data_cache else token_cache.default_root()
    cpus = max(1, (os.cpu_count() or 1) // world)
    num_proc = min(cpus, 8) if cpus > 1 else None
    key = cache_key(s, spec, tokenizer, fingerprint, part)
    return token_cache.ensure(key, root, open_docs, tokenizer, rank, world, num_proc)


def _validation_blocks(s: Settings, spec: SourceSpec, tokenizer, rank: int, world: int, count: int):
    """The first `count` validation blocks of a source (fewer if it holds fewer) and their description: from the
    token cache in memory (the held-out part cached whole, once), packed from the stream when streaming."""
    texts, name, _ = load_documents(s, "validation", spec, lazy=not s.streaming)
    if s.streaming:
        eos = textdata.eos_token_id(tokenizer)
        stream = textdata.pack_blocks(textdata.tokenize_documents(texts(), tokenizer), s.block_size, eos)
        return torch.tensor(list(itertools.islice(stream, count)), dtype=torch.long).view(-1, s.block_size), name
    if separate_validation(s):
        source = s.validation if s.validation is not None else spec.source
        split = s.validation_split if s.validation_split is not None else spec.split
        spec = SourceSpec(source, 1.0, spec.config, split, spec.text_column)
    cached = cached_source(s, spec, tokenizer, rank, world, "validation")
    return cached.rows(list(range(min(count, cached.blocks(s.block_size)))), s.block_size), name


def prepare_data(s: Settings, tokenizer, rank: int = 0, world: int = 1) -> dict:
    """Training sources (cached in memory, or streams), validation blocks, and what the plan reports."""
    if s.objective == "span_corruption":
        return prepare_span_data(s, tokenizer)
    eos = textdata.eos_token_id(tokenizer)
    specs = mixture.source_specs(s)
    weights = mixture.exact_weights([spec.weight for spec in specs])
    if len(specs) > 1 and s.validation_split is not None and s.validation is None:
        raise SettingsError(
            "validation_split cannot apply to a mixture: give validation: SOURCE, or leave both unset to hold out "
            "validation_fraction of every source"
        )
    rows = s.micro_batch_size * s.grad_accum * (1 if s.streaming else world)
    problem = mixture.quota_problem(rows, weights)
    if problem:
        raise SettingsError(problem)
    names = [spec.describe() for spec in specs]
    train_name = (
        names[0]
        if len(specs) == 1
        else f"a mixture of {len(specs)} sources: " + ", ".join(f"{n} ({float(w):.3g})" for n, w in zip(names, weights))
    )
    data: dict[str, Any] = {"train_name": train_name, "eos": eos, "tokenizer": tokenizer, "weights": weights}
    data["sources"] = [{"name": n, "weight": float(w)} for n, w in zip(names, weights)]
    if s.streaming:  # look at the first block only; training packs the stream as it goes
        opens = []
        for k, spec in enumerate(specs):
            with naming(specs, k):
                texts, _, open_train = load_documents(s, "train", spec)
                packed = textdata.pack_blocks(textdata.tokenize_documents(texts(), tokenizer), s.block_size, eos)
                first = next(packed, None)
            if first is None:
                raise SettingsError(
                    f"{_where(specs, k)}training data {names[k]} holds fewer tokens than one block ({s.block_size})"
                )
            opens.append(open_train)
        data.update(rows=None, open_train=opens, train_tokens=None)
        data["holdout"] = 0.0 if separate_validation(s) else s.validation_fraction
    else:
        import datasets

        datasets.disable_progress_bars()  # the cache's filter and map
        sources, documents, tokens = [], 0, 0
        for k, spec in enumerate(specs):
            with naming(specs, k):
                cached = cached_source(s, spec, tokenizer, rank, world)
            if cached.documents == 0:
                raise SettingsError(f"{_where(specs, k)}training data {names[k]} holds no text")
            if cached.blocks(s.block_size) == 0:
                raise SettingsError(
                    f"{_where(specs, k)}training data {names[k]} holds {cached.tokens} tokens, fewer than one block "
                    f"({s.block_size}): give more text or lower block_size"
                )
            sources.append(Rows(cached, s.block_size))
            documents, tokens = documents + cached.documents, tokens + cached.blocks(s.block_size) * s.block_size
            data["sources"][k]["cache"] = {
                "hit": cached.hit,
                "folder": str(cached.folder),
                "parts": cached.shards,
                "tokenized_here": cached.built,
            }
        data.update(rows=sources, train_documents=documents, train_tokens=tokens)

    data["val_blocks"] = None
    if separate_validation(s) or s.validation_fraction > 0:
        val, val_names = [], []
        val_specs = specs[:1] if separate_validation(s) else specs  # else each source's held-out documents
        for k, spec in enumerate(val_specs):
            w = weights[k]  # a mixture's validation: each source's share of max_eval_blocks, rounded up
            share = s.max_eval_blocks if len(val_specs) == 1 else -(-s.max_eval_blocks * w.numerator // w.denominator)
            with naming(specs, k):
                got, val_name = _validation_blocks(s, spec, tokenizer, rank, world, share)
            if len(got) == 0:
                raise SettingsError(
                    f"{_where(specs, k)}validation data {val_name} (validation_fraction={s.validation_fraction}) holds "
                    f"fewer tokens than one block ({s.block_size}): raise validation_fraction, give a validation "
                    f"source, or lower block_size"
                )
            val.append(got)
            val_names.append(val_name)
        data.update(val_blocks=torch.cat(val)[: s.max_eval_blocks], val_name="; ".join(val_names))
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


def step_batches(s: Settings, data: dict, rank: int, procs: int) -> StepBatches:
    """In memory: this process's rows of any step (a pure function of seed and step)."""
    sources = data["rows"] if data.get("rows") is not None else [Rows(tensor=data["train_blocks"])]
    weights = data.get("weights") or mixture.exact_weights([1.0])
    return StepBatches(sources, weights, s.seed, s.micro_batch_size, s.grad_accum, rank, procs)


def stream_batches(
    s: Settings, data: dict, rank: int, procs: int, start_step: int, states: dict | None
) -> StreamBatches:
    """Streaming: this process's rows of every step from its stream parts (one per worker), resumable."""
    parts = procs * max(s.num_workers, 1)

    def open_part(part: int, source_states: list | None) -> list[textdata.PackedStream]:
        return [
            textdata.PackedStream(
                opener,
                data["tokenizer"],
                s.block_size,
                s.shuffle_buffer,
                s.seed + k,
                data["holdout"],
                state=source_states[k] if source_states else None,
                part=part,
                parts=parts,
            )
            for k, opener in enumerate(data["open_train"])
        ]

    rows = s.micro_batch_size * s.grad_accum
    return StreamBatches(
        open_part, data["weights"], rows, rank, s.num_workers, start_step, s.save_every, s.seed, states
    )
