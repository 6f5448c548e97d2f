"""Test-only entry point: run a script with its file-system writes traced, and SIGKILL it at a chosen one.

    python tests/helpers/fault_inject.py SPEC.json SCRIPT [ARGS...]
    accelerate launch tests/helpers/fault_inject.py SPEC.json SCRIPT [ARGS...]

The script itself is untouched (no fault switches inside it): this wrapper patches the write primitives that the
recipe, accelerate, transformers and matplotlib go through (`open`/`io.open` for writing, `os.replace`,
`os.rename`, `shutil.rmtree`, `safetensors.torch.save_file`, `torch.save`) before the script imports them, then
runs the script as `__main__`.

SPEC (JSON) holds `root` (only writes under it count, recorded relative to it), optional `trace` (a file that
receives one JSON line per write event, as it happens) and optional `kill`: {"op", "path", "nth", "how"}, the
`nth` (0-based) event with that op and path. `how` says where the process dies:
    before   the write never starts
    partial  the write ran and left a prefix: half the bytes written, half the files of a folder deleted
    after    the write finished, nothing after it ran
    enospc   the write fails with ENOSPC, as on a full disk (the process lives on)
The files on disk change only at these events, so killing before, inside and after each one reaches every
state a SIGKILL at a random moment can leave.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import runpy
import shutil
import signal
import sys
from pathlib import Path

SPEC = json.loads(Path(sys.argv[1]).read_text())
ROOT = os.path.realpath(SPEC["root"])
KILL = SPEC.get("kill")
TRACE = SPEC.get("trace")
RANK = os.environ.get("RANK", "0")
_counts: dict[tuple[str, str], int] = {}
_real_open = io.open


def _relative(path) -> str | None:
    try:
        full = os.path.realpath(os.fspath(path))
    except TypeError:  # a file object, not a path
        return None
    return os.path.relpath(full, ROOT) if full == ROOT or full.startswith(ROOT + os.sep) else None


def _full(path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _event(op: str, path) -> str | None:
    """Record the event; the `how` to die with when it is the chosen one, else None."""
    rel = _relative(path)
    if rel is None or RANK != "0":
        return None
    n = _counts.get((op, rel), 0)
    _counts[(op, rel)] = n + 1
    if TRACE:
        with _real_open(TRACE, "a") as f:
            f.write(json.dumps({"op": op, "path": rel, "nth": n}) + "\n")
    if KILL and (KILL["op"], KILL["path"], KILL["nth"]) == (op, rel, n):
        return KILL["how"]
    return None


def _halve_file(path) -> None:
    size = os.path.getsize(path)
    os.truncate(path, size // 2)


def _wrap(op: str, real, path_of, halve=_halve_file):
    def wrapped(*args, **kwargs):
        path = path_of(*args, **kwargs)
        how = _event(op, path) if path is not None else None
        if how == "before":
            _die()
        if how == "enospc":
            _full(path)
        result = real(*args, **kwargs)
        if how == "partial":
            halve(path)
            _die()
        if how == "after":
            _die()
        return result

    return wrapped


class _KilledOnClose:
    """A file opened for writing that works as usual until closed: then half of what was written stays (after what
    the file held before, when appending), and we die."""

    def __init__(self, f, path):
        self._f, self._path, self._start = f, path, os.path.getsize(path)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._f.close()
        os.truncate(self._path, self._start + (os.path.getsize(self._path) - self._start) // 2)
        _die()


def _open(file, mode="r", *args, **kwargs):
    writing = any(c in mode for c in "wax+")
    how = _event("open", file) if writing else None
    if how == "before":
        _die()
    if how == "enospc":
        _full(file)
    f = _real_open(file, mode, *args, **kwargs)
    if how == "partial":
        return _KilledOnClose(f, file)
    if how == "after":  # opened (and so created or truncated), nothing written
        _die()
    return f


def _rmtree_partial(path, *args, **kwargs):
    """rmtree; `partial`: half of the folder's files gone, as a kill inside rmtree leaves it."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    how = _event("rmtree", path)
    if how == "before":
        _die()
    if how == "partial":
        for p in files[: len(files) // 2]:
            p.unlink()
        _die()
    _real_rmtree(path, *args, **kwargs)
    if how == "after":
        _die()


_real_rmtree = shutil.rmtree


def install() -> None:
    import safetensors.torch
    import torch

    builtins.open = io.open = _open
    shutil.rmtree = _rmtree_partial
    for name in ("replace", "rename"):
        setattr(os, name, _wrap(name, getattr(os, name), lambda src, dst, *a, **k: src, lambda p: None))
    safetensors.torch.save_file = _wrap(
        "save_file", safetensors.torch.save_file, lambda tensors, filename, *a, **k: filename
    )
    torch.save = _wrap("torch.save", torch.save, lambda obj, f, *a, **k: f if isinstance(f, (str, Path)) else None)


if __name__ == "__main__":
    install()
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
