"""Tokenize an in-memory corpus once, on disk: shared by every process of a run and by every later run.

A cache entry is a folder named by a digest of its key: the source and its fingerprint (files: path, size and
modification time; a hub or folder dataset: its `datasets` fingerprint), its config, split and text column, the
document mode of plain text, the held-out fraction carved out of it, and the tokenizer (a digest of its full
serialisation). The block size is not in the key: an entry holds the packed token stream (each document's tokens,
then EOS), and blocks of any size are cut from it as they are read, exactly as `pack_blocks` would cut them.

An entry is written in `shards` contiguous parts of the documents. Process `r` of `N` tokenizes part `r` (with
`datasets.map(batched=True, num_proc=...)`), then visits the other parts' locks in turn: a part still being
written holds its lock, so a process waits exactly until every part is there; a part whose writer died (or
whose owner did not claim it within `OWNER_GRACE_S`) is written by the next process that finds it missing. Each
part is `tokens.npy` (int32, memory-mapped when read, so the corpus never has to fit in memory) and `meta.json`,
written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from convert.text import sources as textdata

FORMAT = 1  # bump when the layout of an entry changes
OWNER_GRACE_S = 300  # how long a process waits for another part's owner to claim it before writing it itself
MIN_DOCS_PER_PROCESS = 5_000  # below this a pool of tokenizing processes costs more than it saves


def default_root() -> Path:
    if os.environ.get("GQA_CACHE_DIR"):
        return Path(os.environ["GQA_CACHE_DIR"]) / "tokens"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gqa-convert" / "tokens"


def tokenizer_digest(tokenizer) -> str:
    """A digest of everything that decides the token ids: the fast tokenizer's full JSON, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def files_fingerprint(files: list[Path]) -> list[list]:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


@dataclass
class CachedTokens:
    """The packed token stream of one source, across the parts of its cache entry (memory-mapped)."""

    folder: Path
    hit: bool  # the entry was complete before this run looked
    built: list[int] = field(default_factory=list)  # the parts this process tokenized
    shards: int = 1

    def __post_init__(self):
        layout = json.loads((self.folder / "complete.json").read_text())["parts"]
        parts = [self.folder / f"part-{i:05d}-of-{layout:05d}" for i in range(layout)]
        self.metas = [json.loads((p / "meta.json").read_text()) for p in parts]
        self.arrays = [np.load(p / "tokens.npy", mmap_mode="r") for p in parts]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.documents = sum(m["documents"] for m in self.metas)
        self.tokens = int(self.starts[-1])
        self.shards = len(parts)

    def blocks(self, block_size: int) -> int:
        return self.tokens // block_size

    def rows(self, indices: list[int], block_size: int) -> torch.Tensor:
        """Blocks `indices` (of `block_size` tokens) as a [len(indices), block_size] long tensor."""
        out = np.empty((len(indices), block_size), dtype=np.int64)
        for r, i in enumerate(indices):
            start, filled = i * block_size, 0
            part = int(np.searchsorted(self.starts, start, side="right")) - 1
            while filled < block_size:  # a block may run across parts
                offset = start + filled - int(self.starts[part])
                piece = self.arrays[part][offset : offset + block_size - filled]
                out[r, filled : filled + len(piece)] = piece
                filled, part = filled + len(piece), part + 1
        return torch.from_numpy(out)

    def __getstate__(self):  # DataLoader workers started by spawn reopen the maps
        return {"folder": self.folder, "hit": self.hit, "built": self.built}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()


def _writer() -> str:
    """A name for this writer's temporary files (processes and threads alike)."""
    return f"{os.getpid()}-{threading.get_ident()}"


def _tokenize(batch: dict, tokenizer) -> dict:
    return {"input_ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]}


def _write_part(docs, index: int, shards: int, tokenizer, eos: int, final: Path, num_proc: int | None) -> None:
    """Tokenize part `index` of `shards` of `docs` (a `datasets.Dataset` with column `text`) into `final`."""
    tmp = final.with_name(f".tmp-{final.name}-{_writer()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start, end = len(docs) * index // shards, len(docs) * (index + 1) // shards  # contiguous, possibly empty
    part = docs.select(range(start, end))
    if len(part) == 0:  # nothing to tokenize (a tiny held-out part)
        np.save(tmp / "tokens.npy", np.empty(0, dtype=np.int32))
        (tmp / "meta.json").write_text(json.dumps({"documents": 0, "tokens": 0, "part": [index, shards]}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return
    tokenized = part.map(
        _tokenize,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc and len(part) >= MIN_DOCS_PER_PROCESS * num_proc else None,
        remove_columns=part.column_names,
        fn_kwargs={"tokenizer": tokenizer},
        cache_file_name=str(tmp / "documents.arrow"),  # written by datasets, memory-mapped Arrow
        load_from_cache_file=False,
        desc=None,
    )
    chunks = tokenized.data.column("input_ids").chunks
    total = sum(len(c.flatten()) + len(c) for c in chunks)
    out = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.int32, shape=(total,))
    at = 0
    for chunk in chunks:  # documents then EOS, vectorised chunk by chunk
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        values, n = chunk.flatten().to_numpy(), len(chunk)
        docs_of_values = np.repeat(np.arange(n), np.diff(offsets))
        piece = out[at : at + len(values) + n]
        piece[np.arange(len(values)) + docs_of_values] = values
        piece[offsets[1:] + np.arange(n)] = eos
        at += len(values) + n
    out.flush()
    del out, tokenized
    for f in tmp.glob("documents*.arrow"):  # the packed stream is all a run reads
        f.unlink()
    (tmp / "meta.json").write_text(json.dumps({"documents": len(part), "tokens": total, "part": [index, shards]}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def ensure(
    key: dict, root: Path, open_docs, tokenizer, rank: int, world: int, num_proc: int | None = None
) -> CachedTokens:
    """The entry for `key` under `root`, tokenizing this process's part (and any orphaned one) when missing.

    `open_docs()` returns the documents (a `datasets.Dataset`, column `text`, held-out part already removed);
    it is called only when a part has to be written.
    """
    from filelock import FileLock

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    entry = root / digest
    complete = entry / "complete.json"
    if complete.is_file():
        return CachedTokens(entry, hit=True)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "key.json").write_text(json.dumps(key, indent=2, default=str))
    eos = textdata.eos_token_id(tokenizer)
    docs, built = None, []
    for index in [(rank + i) % world for i in range(world)]:  # own part first, then wait on the others
        name = f"part-{index:05d}-of-{world:05d}"
        final, claim = entry / name, entry / f"{name}.claimed"
        lock = FileLock(str(entry / f"{name}.lock"))
        if index != rank:  # its owner may not have started yet: give it OWNER_GRACE_S to claim its part
            deadline = time.monotonic() + OWNER_GRACE_S
            while not claim.exists() and not (final / "meta.json").is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
        with lock:  # held by a writer until its part is complete (released by the kernel if it dies)
            if index == rank:
                claim.touch()
            if (final / "meta.json").is_file():
                continue
            if docs is None:
                docs = open_docs()
            _write_part(docs, index, world, tokenizer, eos, final, num_proc)  # ours, or an orphan's
            built.append(index)
    done_tmp = entry / f".tmp-complete-{_writer()}.json"
    done_tmp.write_text(json.dumps({"parts": world}))
    os.replace(done_tmp, complete)
    return CachedTokens(entry, hit=False, built=built)
