"""Tensor files, one tensor at a time: read safetensors (and, when allowed, pickle) shards; write safetensors
shards whose header is known up front, so tensors stream to disk and no shard is ever held in memory.

Reads use plain file reads, not mmap: pages of a mapped file count towards the process's resident memory,
so mapping a 5 GB shard would make peak memory grow with shard size.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

# safetensors dtype -> (torch dtype name, bytes per element). Headers, plans and pass-through copies use these
# names only, so a conversion can start copying before torch (about a second to import) has loaded.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
BY_TORCH_NAME = {name: st for st, (name, _) in DTYPES.items()}
COPY_CHUNK = 16 << 20  # bytes per read/write when copying a tensor verbatim
WRITE_ALIGN = 64 << 10  # the kernel's copy moves this much per round (16 pages): see copy_raw
PAGE = 4096


def st_dtype(dtype: Any) -> str:
    """The safetensors name of a dtype given as a safetensors name, a torch dtype or a torch dtype name."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in BY_TORCH_NAME:
        raise ConversionError(f"unsupported dtype {dtype}")
    return BY_TORCH_NAME[name]


def torch_dtype(dtype: Any) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[st_dtype(dtype)][0])


def nbytes(dtype: Any, shape: Iterable[int]) -> int:
    return DTYPES[st_dtype(dtype)][1] * math.prod(shape)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype name, shape, and (safetensors) absolute byte offset."""

    file: Path
    st: str  # "BF16", "F32", ...: see DTYPES
    shape: tuple[int, ...]
    offset: int = -1  # -1: pickle file, read through torch.load
    key: str = ""  # the tensor's name inside a pickle file
    # A re-expressed tensor (convert.routes.reexpress): computed from source tensors when read, returned in float32 and
    # written as `st`. None for every tensor stored in a file.
    derive: Any = field(default=None, compare=False, repr=False)

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtype(self.st)

    @property
    def nbytes(self) -> int:
        return nbytes(self.st, self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header and check it as the format requires: every entry well formed, each tensor's
    byte range as long as its dtype and shape say, and the ranges tiling the data exactly (no overlap, no gap,
    nothing missing at the end)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "too short to be a safetensors file")
        (hlen,) = struct.unpack("<Q", head)
        if hlen < 2 or hlen > size - 8 or hlen > 100 << 20:
            raise _corrupt(path, f"its header length field says {hlen} bytes, the file has {size}")
        try:
            header = json.loads(f.read(hlen), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise _corrupt(path, f"its header is not valid JSON ({e})")
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _corrupt(path, "its __metadata__ is not an object")
    base = 8 + hlen
    infos, ranges = {}, []
    for name, h in header.items():
        info, start, stop = _entry(path, name, h, base)
        infos[name] = info
        ranges.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes before it"
            raise _corrupt(path, f"tensor {name} {what}")
        end = stop
    if base + end > size:
        raise ConversionError(
            f"{path} is truncated: the header promises {base + end} bytes, the file has {size}. "
            "Re-download or re-save the checkpoint."
        )
    if base + end < size:
        raise _corrupt(path, f"it has {size - base - end} bytes after its last tensor that no tensor claims")
    return infos, meta


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are unique (json.loads would keep the last of two tensors with one name)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a name appears twice")
    return out


def _corrupt(path: Path, what: str) -> ConversionError:
    return ConversionError(f"{path} is not a valid safetensors file: {what}. Re-download or re-save it")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, h: Any, base: int) -> tuple[TensorInfo, int, int]:
    """One header entry as a TensorInfo, with its byte range in the data; refuses malformed ones."""
    if not isinstance(h, dict):
        raise _corrupt(path, f"the entry of tensor {name} is not an object")
    dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"tensor {name} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _corrupt(path, f"tensor {name} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise _corrupt(path, f"tensor {name} has data_offsets {offsets!r}, not [start, end]")
    start, stop = offsets
    info = TensorInfo(path, dtype, tuple(shape), base + start)
    if stop - start != info.nbytes:
        raise _corrupt(path, f"tensor {name} has {stop - start} bytes for {dtype} shape {info.shape}")
    return info, start, stop


def read_into(info: TensorInfo, buf) -> None:
    """Fill `buf` (a writable byte buffer of info.nbytes) with the tensor's bytes."""
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        if f.readinto(buf) != info.nbytes:
            raise ConversionError(f"{info.file} ended early: the file is truncated; re-download it")


def read_tensor(info: TensorInfo) -> "Tensor":
    import torch

    if info.derive is not None:
        return info.derive()
    if info.offset < 0:
        return _pickle_tensor(info)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    read_into(info, buf.numpy())
    return buf.view(info.dtype).reshape(info.shape)


# Float dtypes that numpy alone can read and write: the torch-free path (see convert.methods.pooling). numpy has no
# bfloat16, but a bfloat16 is the top half of a float32, so integer shifts convert it exactly.
NUMPY_FLOATS = ("F32", "F16", "BF16")


def _numpy_float(st: str) -> Any:
    """The numpy dtype of F32 or F16 (BF16 has none: see NUMPY_FLOATS)."""
    import numpy as np

    return {"F32": np.float32, "F16": np.float16}[st]


def read_stored(info: TensorInfo) -> "np.ndarray":
    """A safetensors tensor of an F32/F16/BF16 dtype as its stored numbers, flat (BF16 as uint16 bit patterns)."""
    import numpy as np

    raw = np.empty(info.nbytes, dtype=np.uint8)
    read_into(info, raw)
    return raw.view(np.uint16 if info.st == "BF16" else _numpy_float(info.st))


def to_float32(stored: "np.ndarray", st: str) -> "np.ndarray":
    """Stored numbers of dtype `st` (as `read_stored` gives them) as float32; F32 comes back as it is."""
    import numpy as np

    if st != "BF16":
        return stored.astype(np.float32, copy=False)
    bits = stored.astype(np.uint32)
    bits <<= 16  # in place: peak memory stays at the bf16 bytes plus one float32 copy, as torch's .float()
    return bits.view(np.float32)


def read_float32(info: TensorInfo) -> "np.ndarray":
    """A safetensors tensor of an F32/F16/BF16 dtype as a float32 numpy array (no torch)."""
    return to_float32(read_stored(info), info.st).reshape(info.shape)


def float32_to(x: "np.ndarray", st: str) -> "np.ndarray":
    """Round a float32 numpy array to an F32/F16/BF16 dtype as torch's `.to()` does (nearest, ties to even);
    bfloat16 comes back as its uint16 bit patterns."""
    import numpy as np

    if st != "BF16":
        with np.errstate(over="ignore"):  # beyond float16's range becomes inf, as in torch: not worth a warning
            return x.astype(_numpy_float(st))
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)  # NaN stays a quiet NaN, as in torch


def tensor_bytes(tensor: "Tensor") -> "np.ndarray":
    """A torch tensor's bytes as a numpy uint8 view (contiguous), for `ShardWriter.write`."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def copy_raw(info: TensorInfo, out_fd: int, out_offset: int, writeback: bool = False) -> None:
    """Copy a tensor's bytes verbatim into `out_fd` at `out_offset` (byte-for-byte pass-through).

    `os.copy_file_range` moves the bytes inside the kernel (or the file system, which may share extents) and
    releases the GIL meanwhile; where it is missing or refused, bounded pread/pwrite chunks do the same. Writes are
    positional, so copies may run on another thread while other tensors of the same file are being written.
    `writeback`: hand the copied range to the disk at once (for an output that will be fsynced).
    """
    left, offset, dst = info.nbytes, info.offset, out_offset
    with open(info.file, "rb", buffering=0) as f:
        fd = f.fileno()
        while left:
            step = min(left, 1 << 30)
            if dst == out_offset and dst % WRITE_ALIGN:
                # The first piece ends on a 64 KiB boundary of the output: the kernel then writes the rest in
                # aligned 64 KiB rounds, which it keeps in large page-cache folios instead of single pages.
                step = min(step, WRITE_ALIGN - dst % WRITE_ALIGN)
            try:
                done = os.copy_file_range(fd, out_fd, step, offset, dst)
            except (AttributeError, OSError) as e:
                if getattr(e, "errno", None) in WRITE_FAILURES:  # chunks would fail the same way
                    raise
                done = _copy_chunk(fd, out_fd, min(left, COPY_CHUNK), offset, dst)
            if done == 0:
                raise ConversionError(f"{info.file} ended early: the file is truncated; re-download it")
            left -= done
            offset += done
            dst += done
    if writeback:
        start_writeback(out_fd, out_offset, info.nbytes)


# Errors of the output side that no other way of copying avoids: disk full, quota, file-size limit, I/O error.
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def named(error: OSError, path: Path) -> OSError:
    """The same error, naming the output file it happened in (positional writes raise it without a name)."""
    if error.filename is None and error.errno is not None:
        return OSError(error.errno, error.strerror, str(path))
    return error


def _copy_chunk(fd: int, out_fd: int, size: int, offset: int, dst: int) -> int:
    chunk = os.pread(fd, size, offset)
    write_all(out_fd, chunk, dst)
    return len(chunk)


def write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None


_SYNC_FILE_RANGE = _sync_file_range()


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """fsync every file in `folder` (not recursive) and the folder itself: its names and contents are on disk."""
    for path in folder.iterdir():
        if path.is_file():
            fsync_path(path)
    fsync_path(folder)


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing a finished range to disk now (SYNC_FILE_RANGE_WRITE, no waiting), so the
    fsync at the end of a shard finds little left to do instead of the whole shard."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, size, 2)


class Copier:
    """Background threads for pass-through copies: while they copy (in the kernel, GIL released), the main thread
    reads and merges the next layer's K/V. Errors surface at the next submit or at `wait`."""

    def __init__(self, threads: int = 1) -> None:
        # One thread: a second one made the kernel's share of the copy slower (measured on 2 cores), not faster.
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gqa-copy")
        self.pending: list = []

    def submit(self, fn, *args, done=None) -> None:
        future = self.pool.submit(fn, *args)
        if done is not None:
            future.add_done_callback(lambda f: not f.cancelled() and f.exception() is None and done())
        self.pending.append(future)
        self._raise_finished()

    def _raise_finished(self) -> None:
        while self.pending and self.pending[0].done():
            self.pending.pop(0).result()

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self) -> "Copier":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# Pickle (.bin) shards: only with --allow-pickle, loaded with weights_only=True and mmap so that a shard is not
# read whole. One shard stays open at a time.
_pickle_cache: dict[Path, dict[str, "Tensor"]] = {}


def read_pickle_header(path: Path) -> dict[str, TensorInfo]:
    import torch

    state = _open_pickle(path)
    return {
        k: TensorInfo(path, st_dtype(v.dtype), tuple(v.shape), key=k)
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def _open_pickle(path: Path) -> dict[str, "Tensor"]:
    import torch

    if path not in _pickle_cache:
        _pickle_cache.clear()
        try:
            _pickle_cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many kinds here; all mean "not a loadable weights file"
            raise ConversionError(f"{path} could not be loaded as weights ({type(e).__name__}: {e})")
    return _pickle_cache[path]


def _pickle_tensor(info: TensorInfo) -> "Tensor":
    return _open_pickle(info.file)[info.key]


def header_pad(header_end: int, copies: list[tuple[int, int, int]]) -> int:
    """Spaces to append to a safetensors header that ends at byte `header_end` (JSON padding, as the format allows).

    `copies`: (offset in the data, absolute offset in its source file, bytes) of each tensor copied verbatim. The
    pad keeps the data 8-byte aligned and puts the most copied bytes at the same offset within a page as in their
    source: the kernel copies such a tensor page to page, otherwise every page it writes straddles two (measured:
    15-20% more kernel time for the copy).
    """
    weight: dict[int, int] = {}
    for data_offset, source_offset, size in copies:
        phase = (source_offset - header_end - data_offset) % PAGE
        if phase % 8 == (-header_end) % 8:
            weight[phase] = weight.get(phase, 0) + size
    if not weight:
        return -header_end % 8
    return max(weight, key=lambda phase: (weight[phase], -phase))


class ShardWriter:
    """Write one safetensors file whose tensors (names, dtypes, shapes) are declared before any data.

    Every tensor's place in the file is known from the header, so writes are positional: pass-through copies can
    run on a `Copier` thread while merged tensors are written from the main thread.
    """

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, Any, tuple[int, ...]]],
        metadata: dict,
        copier: Copier,
        durable: bool = False,
        copied: dict[str, int] | None = None,
    ):
        self.path = path
        self.copier = copier
        self.durable = durable  # fsynced by `finish`: every range goes to writeback as soon as it is written
        header: dict = {"__metadata__": metadata}
        offset = 0
        self.places: dict[str, tuple[int, int]] = {}  # name -> (bytes, offset from the start of the data)
        for name, dtype, shape in entries:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.places[name] = (size, offset)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        runs = [(self.places[name][1], src, self.places[name][0]) for name, src in (copied or {}).items()]
        raw += b" " * header_pad(8 + len(raw), runs)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        except OSError as e:
            self.discard()
            raise named(e, path) from e
        self.base = 8 + len(raw)
        self.written: set[str] = set()

    def _place(self, name: str, size: int) -> int:
        """The file offset of a declared tensor, after checking its size and that it is written once."""
        want_size, offset = self.places.get(name, (None, 0))
        if want_size != size or name in self.written:
            raise AssertionError(
                f"{self.path}: wrote {name} ({size} B), header expects {want_size} B "
                f"{'(written twice)' if name in self.written else ''}"
            )
        self.written.add(name)
        return self.base + offset

    def write(self, name: str, data: "np.ndarray") -> None:
        """Write a tensor given as a contiguous numpy array of its bytes in the declared dtype."""
        size = data.nbytes
        offset = self._place(name, size)
        try:
            write_all(self.fd, data, offset)
        except OSError as e:
            raise named(e, self.path) from e
        if self.durable:
            start_writeback(self.fd, offset, size)

    def write_raw(self, name: str, info: TensorInfo, done=None) -> None:
        """Hand a verbatim copy of `info` to the copier thread; `done` runs there once it is written."""
        self.copier.submit(self._copy, info, self._place(name, info.nbytes), done=done)

    def _copy(self, info: TensorInfo, offset: int) -> None:
        try:
            copy_raw(info, self.fd, offset, self.durable)
        except OSError as e:
            if e.errno not in WRITE_FAILURES:  # a read error of the source file: its own name is the one to give
                raise
            raise named(e, self.path) from e

    def close(self) -> None:
        """Check that every declared tensor was written (or handed to the copier)."""
        if len(self.written) != len(self.places):
            raise AssertionError(f"{self.path}: {len(self.places) - len(self.written)} tensors were never written")

    def finish(self) -> None:
        """Close, once every copy into this file is done (durable: fsync first, on disk before the rename)."""
        if self.durable:
            try:
                os.fsync(self.fd)
            except OSError as e:
                raise named(e, self.path) from e
        self.discard()

    def discard(self) -> None:
        """Close the file descriptor (idempotent); the caller removes the file."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
