"""OUTPUT on disk: the checks before writing, a lock beside it, a temporary folder that becomes it by one rename,
and write errors (disk full, file-size limit) turned into one clear message.

Folders and files beside OUTPUT, all named after it and after the host and process that made them, so that runs
on other hosts of a shared or network file system are never mistaken for this host's dead ones:

    .NAME.gqa-lock            held (flock) for the whole run; says "host pid" inside
    .NAME.gqa-tmp-HOST-PID    the conversion being written; renamed to NAME once complete and verified
    .NAME.gqa-old-HOST-PID    an OUTPUT being replaced, where the system cannot swap two folders in one step
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import socket
from pathlib import Path

from convert.errors import ConversionError

# Room kept free beside the output: the small files (config, card, provenance) and the file system's own needs.
SPARE_BYTES = 64 << 20
SPACE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}


def host_name() -> str:
    """This machine's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.gqa-lock"


def temp_folder(output: Path) -> Path:
    """`.NAME.gqa-tmp-HOST-PID` beside OUTPUT (not created)."""
    return output.parent / f".{output.name}.gqa-tmp-{host_name()}-{os.getpid()}"


def remove_stale_temp_folders(output: Path) -> list[Path]:
    """Remove temporary folders of OUTPUT left by killed runs of this host (their PID is not alive here).

    Another host's folders are never touched: a PID says nothing about a process on another machine, and on a
    shared file system that folder may be a conversion running there right now. Folders named without a host
    (`.NAME.gqa-tmp-PID`, from versions that wrote no host name) are taken as this host's.
    """
    removed = []
    for kind in ("tmp", "old"):
        prefixes = [f".{output.name}.gqa-{kind}-{host_name()}-", f".{output.name}.gqa-{kind}-"]
        for prefix, stale in ((p, f) for p in prefixes for f in output.parent.glob(f"{glob_escape(p)}*")):
            pid = stale.name[len(prefix) :]
            # Only digits after the prefix: another host's `HOST-PID` is never read as an old-format PID.
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


class OutputLock:
    """An exclusive lock on OUTPUT, a file `.NAME.gqa-lock` beside it that holds "host pid".

    The file is created with O_EXCL and held with flock, which the kernel releases when the process dies (also by
    SIGKILL): a lock file of this host that nobody holds was left by a killed run and is taken over. A free lock
    file written by another host is refused all the same, naming the file to remove: not every network file
    system passes flock between hosts, so a free lock there does not prove that the other run has ended.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = lock_path(output)
        self.fd = -1

    def acquire(self) -> "OutputLock":
        me = f"{host_name()} {os.getpid()}\n"
        while self.fd < 0:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # released between the two opens: try again
                    continue
            if not self._lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise ConversionError(self._held_message(holder))
            if not _same_file(fd, self.path):  # released and removed while we waited for it: try again
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if holder and holder.split()[0] != host_name():
                os.close(fd)
                raise ConversionError(self._held_message(holder, maybe_stale=True))
            self.fd = fd
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, me.encode(), 0)
            except OSError as e:  # a full disk, say: no lock file stays behind
                self.release()
                raise OSError(e.errno, e.strerror, str(self.path)) from e
        return self

    @staticmethod
    def _lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _held_message(self, holder: str, maybe_stale: bool = False) -> str:
        host, _, pid = holder.partition(" ")
        who = f"pid {pid} on host {host}" if pid else "a process that is starting"
        if maybe_stale:
            return (
                f"OUTPUT {self.output} is locked by a conversion on another host ({who}; lock file {self.path}). "
                f"Wait for it to finish or choose another OUTPUT; if no conversion runs there any more, remove "
                f"{self.path} and try again"
            )
        return (
            f"another conversion ({who}) is writing OUTPUT {self.output} right now: wait for it to finish, or "
            f"choose another OUTPUT"
        )

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order, so nobody locks a file about to vanish)."""
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def check_output(src_folder: Path, output: Path, overwrite: bool, needed_bytes: int) -> None:
    """Refuse outputs that would lose data: inside SOURCE, non-empty without --overwrite, or no room on disk."""
    out, srcp = output.resolve(), src_folder.resolve()
    if out == srcp or srcp in out.parents:
        raise ConversionError(f"OUTPUT {output} is inside SOURCE {src_folder}: choose a folder outside it")
    if out in srcp.parents:
        raise ConversionError(f"OUTPUT {output} contains SOURCE {src_folder}: choose another folder")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"OUTPUT {output} is a file: choose a folder path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"OUTPUT {output} exists and is not empty: pass --overwrite to replace it")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes + SPARE_BYTES:
        raise ConversionError(
            f"not enough free disk space at {parent}: need {needed_bytes / 1e9:.2f} GB, have {free / 1e9:.2f} GB"
        )


def is_write_error(error: OSError, output: Path) -> bool:
    """Whether an error is the output side's: a full disk, the size limit, or a file of OUTPUT's own (its lock,
    its temporary folder, OUTPUT itself), rather than a source file that could not be read."""
    if error.errno in SPACE_ERRORS or error.errno == errno.EFBIG:
        return True
    name = str(error.filename or "")
    return name == str(output) or name.startswith(str(output.parent / f".{output.name}.gqa-"))


def write_error(error: OSError, output: Path, needed_bytes: int, largest_file: int) -> ConversionError:
    """One line for a failed write: which file, what ran out, and how much room the conversion needs."""
    where = error.filename or f"the temporary folder beside {output}"
    need = f"{(needed_bytes + SPARE_BYTES) / 1e9:.2f} GB"
    if error.errno in SPACE_ERRORS:
        free = shutil.disk_usage(output.parent).free if output.parent.exists() else 0
        return ConversionError(
            f"writing {where} failed: {SPACE_ERRORS[error.errno]} (the conversion needs {need} free beside "
            f"{output}, {free / 1e9:.2f} GB are free now). Free some space or choose an OUTPUT on another disk, "
            f"then run again"
        )
    if error.errno == errno.EFBIG:
        return ConversionError(
            f"writing {where} failed: the file is larger than this process may write (the file-size limit, "
            f"`ulimit -f`, or the file system's largest file). Raise the limit above {largest_file / 1e6:.1f} MB "
            f"(the largest output file) or pass a --max-shard-size below it"
        )
    return ConversionError(f"writing {where} failed: {error.strerror or error}. Check OUTPUT's disk and permissions")


RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished folder to OUTPUT. An existing OUTPUT (--overwrite) is swapped with it in one step, so
    that a kill at any moment leaves either the old OUTPUT or the new one; the old one, now at `tmp`, is removed.
    Where the swap is not available, the old OUTPUT is moved aside first."""
    if not output.exists():
        os.replace(tmp, output)
        return
    if _exchange(tmp, output):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tmp.with_name(tmp.name.replace(".gqa-tmp-", ".gqa-old-", 1))
    os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
