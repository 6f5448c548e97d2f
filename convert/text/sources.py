"""Text sources for uptraining, calibration and evaluation: local files or a hub dataset, through `datasets`.

One vocabulary for every part of gqa-convert that reads text:

* a **source** is local files (`.txt`, `.jsonl`, `.json`, `.parquet`; a path, a glob or a list of them) or the name
  of a dataset on the Hugging Face hub (or a local dataset folder), with an optional config and split;
* `load_text_dataset` turns a source into a `datasets` dataset of documents with one column, `text`
  (an `IterableDataset` when `streaming=True`, for corpora larger than memory or disk);
* `tokenize_documents` + `pack_blocks` turn documents into fixed-size token blocks, documents joined with the
  tokenizer's EOS token after each one, the partial last block dropped;
* `carve` splits documents into a training and a held-out part, deterministically by position;
* `PackedStream` packs a streamed corpus epoch after epoch, with a JSON state to resume from without replay;
* `sample_token_ids` draws a seeded stream of tokens from a source (calibration, quick evaluation).

Plain-text files are cut into documents by `txt_documents`:

* `"wikitext"`: a document starts at every top-level heading line ` = Title = ` (WikiText's article boundary;
  `= = Section = =` lines stay inside their article). The document keeps its text exactly as in the file, so the
  documents joined back together are the file.
* `"paragraphs"`: documents are separated by blank (whitespace-only) lines, stripped.
* `"lines"`: every non-blank line is a document, stripped.
* `"file"`: each file is one document.
* `"auto"` (default): `"wikitext"` when the first 1,000 lines of the file hold such a heading, else `"paragraphs"`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from convert.errors import DataError

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TXT_MODES = ("auto", "wikitext", "paragraphs", "lines", "file")
TxtMode = Literal["auto", "wikitext", "paragraphs", "lines", "file"]
Source = str | os.PathLike | Sequence[str | os.PathLike]

# A WikiText article title: " = Title = " (exactly one '=' each side; sections use "= = ... = =").
_WIKITEXT_TITLE = re.compile(r"^\s*= (?!=).*(?<!=) =\s*$")


# ----------------------------------------------------------------------------------------------- sources


def local_files(source: Source) -> list[Path] | None:
    """The files a source names, or None when it names a hub dataset (or a dataset folder).

    A source is local files when it is a list, or a string with a known suffix, a glob pattern, or an existing
    file. Globs are expanded and sorted; a pattern or path that matches nothing is an error, not a hub name.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DataError("the data source is an empty list: name at least one file")
    single = len(items) == 1 and isinstance(source, (str, os.PathLike))
    if single:
        text = os.fspath(items[0])
        looks_local = Path(text).suffix.lower() in FILE_BUILDERS or glob.has_magic(text) or Path(text).is_file()
        if not looks_local:
            return None  # a hub name ("wikitext") or a dataset folder
    files: list[Path] = []
    for item in items:
        text = os.path.expanduser(os.fspath(item))
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        matches = [m for m in matches if not Path(m).is_dir()] if glob.has_magic(text) else matches
        if not matches:
            raise DataError(f"no file matches {text!r}: check the pattern (relative paths start at {os.getcwd()})")
        for m in matches:
            path = Path(m)
            if not path.is_file():
                raise DataError(f"data file {str(path)!r} does not exist (relative paths start at {os.getcwd()})")
            if path.suffix.lower() not in FILE_BUILDERS:
                raise DataError(
                    f"data file {str(path)!r} has an unsupported type {path.suffix!r}: use " + ", ".join(FILE_BUILDERS)
                )
            files.append(path)
    kinds = {FILE_BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(f"data files mix kinds ({', '.join(sorted(kinds))}): give one kind of file per source")
    return files


def describe_source(source: Source, config: str | None = None, split: str | None = None) -> str:
    """A short human description of a source, for plans, model cards and errors."""
    files = None
    with contextlib.suppress(DataError):
        files = local_files(source)
    if files is not None:
        names = [str(f) for f in files]
        return names[0] if len(names) == 1 else f"{len(names)} files ({names[0]}, ...)"
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source)
    return text + (f" ({config})" if config else "") + (f" [{split}]" if split else "")


# ----------------------------------------------------------------------------------------------- plain text


def detect_txt_mode(path: Path) -> str:
    """`wikitext` when the file's first 1,000 lines hold a ` = Title = ` heading, else `paragraphs`."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 1000:
                break
            if _WIKITEXT_TITLE.match(line):
                return "wikitext"
    return "paragraphs"


def iter_txt_documents(files: Sequence[str | Path], mode: str = "auto") -> Iterator[str]:
    """Documents of plain-text files, read line by line (the files are never held in memory whole)."""
    if mode not in TXT_MODES:
        raise DataError(f"txt_documents must be one of {', '.join(TXT_MODES)}, got {mode!r}")
    for file in files:
        file_mode = detect_txt_mode(Path(file)) if mode == "auto" else mode
        with open(file, encoding="utf-8") as f:
            if file_mode == "file":
                text = f.read()
                if text.strip():
                    yield text
                continue
            if file_mode == "lines":
                for line in f:
                    if line.strip():
                        yield line.strip()
                continue
            current: list[str] = []
            for line in f:
                starts_new = _WIKITEXT_TITLE.match(line) if file_mode == "wikitext" else not line.strip()
                if starts_new:
                    doc = "".join(current)
                    if doc.strip():
                        yield doc if file_mode == "wikitext" else doc.strip()
                    current = [line] if file_mode == "wikitext" else []
                else:
                    current.append(line)
            doc = "".join(current)
            if doc.strip():
                yield doc if file_mode == "wikitext" else doc.strip()


def _txt_generator(files: list[str], mode: str) -> Iterator[dict]:
    for doc in iter_txt_documents(files, mode):
        yield {"text": doc}


# ----------------------------------------------------------------------------------------------- datasets


def load_text_dataset(
    source: Source,
    *,
    config: str | None = None,
    split: str | None = None,
    text_column: str = "text",
    streaming: bool = False,
    txt_documents: TxtMode = "auto",
):
    """A `datasets` dataset of documents, one column `text`, from local files or a hub dataset.

    `split` applies to hub datasets and dataset folders (default `train`); local files are one split.
    `text_column` names the column holding the text in `.jsonl` / `.json` / `.parquet` files and hub datasets
    (plain-text files have no columns). With `streaming=True` the result is an `IterableDataset` read lazily.
    """
    import datasets

    files = local_files(source)
    if files is not None and FILE_BUILDERS[files[0].suffix.lower()] == "text":
        names = [str(f) for f in files]
        if streaming:
            return datasets.IterableDataset.from_generator(
                _txt_generator, gen_kwargs={"files": names, "mode": txt_documents}
            )
        docs = list(iter_txt_documents(names, txt_documents))
        if not docs:
            raise DataError(f"{describe_source(source)} holds no text (the file is empty or blank)")
        return datasets.Dataset.from_dict({"text": docs})

    where = describe_source(source, config, split)
    try:
        if files is not None:
            builder = FILE_BUILDERS[files[0].suffix.lower()]
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming)
        else:
            ds = datasets.load_dataset(os.fspath(source), config, split=split or "train", streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; name the source and pass its reason on
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if files is None and not Path(os.fspath(source)).exists():
            hint = " (a hub dataset needs network access; local files need a .txt/.jsonl/.json/.parquet suffix)"
        raise DataError(f"could not load {where}: {message}{hint}") from e
    return _select_text_column(ds, text_column, where)


def _select_text_column(ds, text_column: str, where: str):
    columns = ds.column_names
    if columns is None:  # a stream of unknown schema: look at its first row
        first = next(iter(ds), None)
        if first is None:
            raise DataError(f"{where} holds no rows")
        columns = list(first)
    if text_column not in columns:
        raise DataError(
            f"text column {text_column!r} not found in {where}; its columns are: {', '.join(columns)}. "
            f"Set text_column to the one holding the text."
        )
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def iter_texts(ds, batch_size: int = 1000) -> Iterator[str]:
    """The non-empty documents of a dataset from `load_text_dataset`, in order."""
    for batch in ds.iter(batch_size=batch_size):
        for text in batch["text"]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"the text column holds {type(text).__name__} values, not strings")
            if text.strip():
                yield text


def held_out(index: int, fraction: float) -> bool:
    """Whether document `index` belongs to the held-out part: floor((i + 1) * f) > floor(i * f), which spreads
    exactly `fraction` of the documents evenly (every 20th for 0.05)."""
    return int((index + 1) * fraction) > int(index * fraction)


def carve(texts: Iterable[str], fraction: float, part: Literal["train", "validation"]) -> Iterator[str]:
    """The training or the held-out part of a document stream (see `held_out`)."""
    if not 0 <= fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    want_validation = part == "validation"
    for i, text in enumerate(texts):
        if held_out(i, fraction) == want_validation:
            yield text


def shuffled(items: Iterable[Any], buffer_size: int, seed: int) -> Iterator[Any]:
    """A seeded buffer shuffle of a stream (the same seed gives the same order)."""
    rng = random.Random(seed)
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


# ----------------------------------------------------------------------------------------------- tokens


def eos_token_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no EOS token, needed between packed documents: set one with "
            "tokenizer.eos_token = '...' and save it again"
        )
    return int(eos)


def tokenize_documents(texts: Iterable[str], tokenizer, batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens (EOS is added by `pack_blocks`)."""
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def pack_blocks(token_docs: Iterable[Sequence[int]], block_size: int, eos_id: int) -> Iterator[list[int]]:
    """Fixed blocks of `block_size` tokens from documents joined with `eos_id` after each one.

    Blocks cross document boundaries (no padding, every token is trained on); the partial last block is dropped.
    """
    if block_size < 2:
        raise DataError(f"block_size must be at least 2, got {block_size}")
    buffer: list[int] = []
    start = 0
    for ids in token_docs:
        buffer.extend(ids)
        buffer.append(eos_id)
        while len(buffer) - start >= block_size:
            yield buffer[start : start + block_size]
            start += block_size
        if start > 1 << 16:  # drop the consumed head now and then, not on every block
            del buffer[:start]
            start = 0


class PackedStream:
    """Packed blocks from a streamed corpus, epoch after epoch, resumable without replaying what was read.

    Documents (minus the held-out ones, when `holdout` > 0) pass a seeded shuffle buffer (reseeded every epoch),
    are tokenized and packed with EOS after each one, exactly like `pack_blocks`. `state()` is everything needed
    to continue from the current block: the epoch, the dataset's own position (`IterableDataset.state_dict`),
    the document count, the shuffle buffer and its RNG, and the tokens of the unfinished block. It is plain JSON.
    """

    def __init__(
        self,
        open_dataset,
        tokenizer,
        block_size: int,
        buffer_size: int,
        seed: int,
        holdout: float = 0.0,
        state: dict | None = None,
    ):
        if block_size < 2:
            raise DataError(f"block_size must be at least 2, got {block_size}")
        self.open_dataset, self.tokenizer, self.eos = open_dataset, tokenizer, eos_token_id(tokenizer)
        self.block_size, self.buffer_size, self.seed, self.holdout = block_size, buffer_size, seed, holdout
        self.epoch, self.documents, self.buffer, self.tokens, self.source = 0, 0, [], [], None
        self.draining = False  # the epoch's documents are all read; the shuffled buffer is being emptied
        self.rng = random.Random(self._epoch_seed())
        if state is not None:
            self.epoch, self.documents, self.source = state["epoch"], state["documents"], state["source"]
            self.draining = state["draining"]
            self.buffer, self.tokens = list(state["buffer"]), list(state["tokens"])
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))

    def _epoch_seed(self) -> int:
        return self.seed * 100_003 + self.epoch

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "documents": self.documents,
            "source": self.source,
            "draining": self.draining,
            "buffer": list(self.buffer),
            "tokens": list(self.tokens),
            "rng": list(self.rng.getstate()),
        }

    def _epoch_documents(self) -> Iterator[str]:
        """The rest of this epoch's documents, from the saved position of the source."""
        ds = self.open_dataset()
        if self.source is not None:
            ds.load_state_dict(self.source)
        for example in ds:
            self.source = ds.state_dict()
            text = example["text"]
            if text is None or not str(text).strip():
                continue  # not a document (and not counted, as in `iter_texts`)
            index = self.documents
            self.documents += 1
            if self.holdout and held_out(index, self.holdout):
                continue
            yield text

    def _pack(self, text: str) -> Iterator[list[int]]:
        self.tokens.extend(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        self.tokens.append(self.eos)
        yield from self._full_blocks()

    def _full_blocks(self) -> Iterator[list[int]]:
        while len(self.tokens) >= self.block_size:
            block = self.tokens[: self.block_size]
            del self.tokens[: self.block_size]  # the state moves before the block leaves
            yield block

    def blocks(self) -> Iterator[list[int]]:
        yield from self._full_blocks()  # a restored stream first finishes its unfinished tokens
        while True:
            fresh, kept = self.source is None and not self.buffer, 0
            if not self.draining:
                for text in self._epoch_documents():
                    kept += 1
                    if len(self.buffer) < self.buffer_size:
                        self.buffer.append(text)
                        continue
                    j = self.rng.randrange(self.buffer_size)
                    text, self.buffer[j] = self.buffer[j], text
                    yield from self._pack(text)
                self.rng.shuffle(self.buffer)
                self.draining = True
            while self.buffer:
                kept += 1
                yield from self._pack(self.buffer.pop())
            if fresh and not kept:
                raise DataError("the data stream holds no training documents")
            # the next epoch: the unfinished block carries over
            self.epoch, self.documents, self.source, self.draining = self.epoch + 1, 0, None, False
            self.rng = random.Random(self._epoch_seed())


def count_tokens(texts: Iterable[str], tokenizer) -> int:
    """Tokens of a document stream, EOS after each document included (what `pack_blocks` would see)."""
    return sum(len(ids) + 1 for ids in tokenize_documents(texts, tokenizer))


def sample_token_ids(
    source: Source,
    tokenizer,
    n_tokens: int,
    seed: int | None = 0,
    *,
    config: str | None = None,
    split: str | None = None,
    text_column: str = "text",
    streaming: bool = False,
    txt_documents: TxtMode = "auto",
    buffer_size: int = 10_000,
) -> torch.Tensor:
    """`n_tokens` token ids drawn from a source: documents in a seeded shuffled order (`seed=None`: the source's
    own order), joined with EOS after each one, cut at `n_tokens`. Raises `DataError` when the source is smaller.
    """
    if n_tokens <= 0:
        raise DataError(f"n_tokens must be positive, got {n_tokens}")
    ds = load_text_dataset(
        source,
        config=config,
        split=split,
        text_column=text_column,
        streaming=streaming,
        txt_documents=txt_documents,
    )
    texts: Iterable[str] = iter_texts(ds)
    if seed is not None:
        texts = shuffled(texts, buffer_size, seed)
    eos = eos_token_id(tokenizer)
    out: list[int] = []
    for ids in tokenize_documents(texts, tokenizer):
        out.extend(ids)
        out.append(eos)
        if len(out) >= n_tokens:
            return torch.tensor(out[:n_tokens], dtype=torch.long)
    raise DataError(
        f"{describe_source(source, config, split)} has only {len(out)} tokens, fewer than the {n_tokens} asked for"
    )
