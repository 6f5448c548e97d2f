"""Faults on the converter: SIGKILL at seeded random moments of a run, a full disk and the file-size limit, two
conversions into one OUTPUT, other hosts' temporary folders, and torch's thread count after a failed run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from convert import convert_checkpoint
from convert.cli import main
from convert.errors import ConversionError
from convert.pipeline.output import host_name
from tests.helpers.tiny import save, tiny_model

KILLS = 20
CALIBRATED = {"calibration_data": "random", "calibration_tokens": 64}
METHOD_ARGS = {
    "mean": ["--method", "mean"],
    "calibrated": ["--method", "calibrated", "--calibration-data", "random", "--calibration-tokens", "64"],
}
METHOD_OPTIONS = {"mean": None, "calibrated": CALIBRATED}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A 21 MB llama in ten 2 MB shards: large enough that writing the output takes a visible part of a run."""
    model = tiny_model(
        "llama",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=4000,
    )
    return save(model, tmp_path_factory.mktemp("sharded") / "src", shard="2MB")


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory) -> Path:
    """The default tiny llama in three shards: a calibrated run's time is its imports and calibration."""
    return save(tiny_model("llama"), tmp_path_factory.mktemp("tiny") / "src")


@pytest.fixture
def small(tmp_path) -> Path:
    return save(tiny_model("llama"), tmp_path / "src")


def digest(folder: Path) -> dict[str, str]:
    """Every file's sha256; the provenance file without the times in it (the only fields two runs differ in)."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "gqa_convert.json":
            info = json.loads(data)
            info.pop("created")
            info.get("calibration", {}).pop("time_s", None)
            data = json.dumps(info, sort_keys=True).encode()
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(output: Path) -> list[Path]:
    """Temporary folders and lock files of OUTPUT."""
    return sorted(output.parent.glob(f".{output.name}.gqa-*"))


def command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "convert.cli", "convert", str(src), str(out), "-g", "1", "-q", *extra]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL anywhere


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "model", "shard"), [("mean", "sharded", "2MB"), ("calibrated", "tiny_sharded", "100KB")]
)
def test_sigkill_at_20_random_moments_loses_nothing(method, model, shard, request, tmp_path):
    """An uninterrupted run is timed (start to exit, and while its temporary folder exists) and kept as the
    reference. Then 20 runs are killed at seeded random moments: 10 across the whole run (one in each tenth of it),
    10 inside the writing (a random part of the write time after the temporary folder appears). Even runs write a
    fresh OUTPUT, odd ones --overwrite a complete one. After every kill: OUTPUT is absent or byte-identical to the
    reference (an odd run's is never absent), the source is unchanged, and the next conversion succeeds and clears
    what the killed one left."""
    src = request.getfixturevalue(model)
    source_before = digest(src)
    args = ["--max-shard-size", shard, "--overwrite", *METHOD_ARGS[method]]
    reference = tmp_path / "reference"
    started = time.monotonic()
    proc = subprocess.Popen(command(src, reference, *args))
    write_start = None
    while proc.poll() is None:
        if write_start is None and list(tmp_path.glob(".reference.gqa-tmp-*")):
            write_start = time.monotonic()
        time.sleep(0.001)
    duration, write_time = time.monotonic() - started, time.monotonic() - (write_start or started)
    assert proc.returncode == 0 and write_start is not None
    want = digest(reference)
    rng = random.Random(f"kill-{method}")
    half = KILLS // 2
    moments = [("run", duration * (i + rng.random()) / half) for i in range(half)]
    moments += [("write", write_time * rng.random()) for _ in range(half)]
    out = tmp_path / "out"
    killed = mid_write = 0
    for i, (phase, moment) in enumerate(moments):
        fresh = i % 2 == 0
        if fresh and out.exists():
            shutil.rmtree(out)
        proc = subprocess.Popen(command(src, out, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if phase == "write":
            while not list(tmp_path.glob(".out.gqa-tmp-*")) and proc.poll() is None:
                time.sleep(0.001)
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        mid_write += bool(list(tmp_path.glob(".out.gqa-tmp-*")))  # a half-written temporary folder is left
        where = f"kill {i} ({phase}, {moment:.2f} s)"
        if out.exists():
            assert digest(out) == want, f"{where} left a wrong OUTPUT"
        else:
            assert fresh, f"{where} lost the complete OUTPUT it was replacing"
        assert digest(src) == source_before
        convert_checkpoint(
            src, out, 1, method, max_shard_size=shard, overwrite=True, progress=False,
            method_options=METHOD_OPTIONS[method],
        )  # fmt: skip
        assert digest(out) == want
        assert leftovers(out) == [], f"{where}: the next run left {leftovers(out)}"
    # Most kills find the run still going (a later run may be faster than the timed one), some mid-write.
    assert killed >= KILLS // 2 and mid_write >= 1, (killed, mid_write, duration, write_time)


# ---------------------------------------------------------------------------------------------------------------
# Disk full, file-size limit


def test_file_size_limit_fails_cleanly_and_a_rerun_succeeds(small, tmp_path):
    """RLIMIT_FSIZE below the one output shard: the write fails with EFBIG (Python ignores SIGXFSZ)."""
    out = tmp_path / "out"
    limit = sum(p.stat().st_size for p in small.glob("*.safetensors")) // 3

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(command(small, out), preexec_fn=limited, capture_output=True, text=True)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr
    [line] = error_lines(failed.stderr)
    assert "model.safetensors failed" in line and "file-size limit" in line and "--max-shard-size below it" in line
    assert not out.exists() and leftovers(out) == []
    ok = subprocess.run(command(small, out), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


def _full_disk(monkeypatch, where: str, after: int = 0) -> list[str]:
    """Make writes fail with ENOSPC: `copy` the kernel copies of pass-through tensors (copier thread), `write`
    the positional writes (headers and merged tensors) once `after` bytes went through, `small` the config."""
    hits: list[str] = []
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "copy":

        def copy_file_range(*args):
            hits.append("copy")
            raise enospc

        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    elif where == "write":
        real, written = os.pwrite, [0]

        def pwrite(fd, data, offset):
            if written[0] + len(data) > after:
                hits.append("write")
                raise enospc
            written[0] += len(data)
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    else:
        real_text = Path.write_text

        def write_text(self, text, *args, **kwargs):
            if self.name == "config.json" and ".gqa-tmp-" in self.parent.name:
                hits.append("small")
                raise enospc
            return real_text(self, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    return hits


@pytest.mark.parametrize(
    ("where", "after", "file"),
    [
        ("copy", 0, "/.out.gqa-tmp-*/model-00001-of-0000?.safetensors"),  # the copier thread's first copy
        ("write", 0, "/.out.gqa-lock"),  # the first write of all
        ("write", 2_000, "/.out.gqa-tmp-*/model-0000?-of-0000?.safetensors"),  # past the headers: a merged tensor
        ("small", 0, "/.out.gqa-tmp-*/config.json"),
    ],
)
def test_disk_full_fails_cleanly_and_a_rerun_succeeds(where, after, file, small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["convert", str(small), str(out), "-g", "1", "-q", "--max-shard-size", "100KB"]
    hits = _full_disk(monkeypatch, where, after)
    failed = CliRunner().invoke(main, args)
    assert hits, "the injected fault was never reached"
    assert failed.exit_code == 2, failed.output
    [line] = error_lines(failed.output)
    assert fnmatch(line, f"error: writing {tmp_path}{file} failed: the disk is full (the conversion needs *")
    assert "GB free beside" in line and "Free some space or choose an OUTPUT on another disk" in line
    assert "Traceback" not in failed.output
    assert not out.exists() and leftovers(out) == []
    monkeypatch.undo()
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


# ---------------------------------------------------------------------------------------------------------------
# Two conversions, one OUTPUT; other hosts


def test_a_second_conversion_into_the_same_output_is_refused(sharded, tmp_path):
    """A is stopped (SIGSTOP) while writing, so B certainly runs while A holds the lock; B, plain or with
    --overwrite, is refused and touches nothing; A then completes with the right OUTPUT."""
    out = tmp_path / "out"
    a = subprocess.Popen(command(sharded, out, "--max-shard-size", "2MB"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.gqa-tmp-*")) and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    a.send_signal(signal.SIGSTOP)
    try:
        assert a.poll() is None, "A finished before it could be stopped"
        for extra in ([], ["--overwrite"]):
            b = subprocess.run(command(sharded, out, *extra), capture_output=True, text=True)
            assert b.returncode == 2, b.stderr
            [line] = error_lines(b.stderr)
            assert f"another conversion (pid {a.pid} on host {host_name()}) is writing OUTPUT" in line
            assert "wait for it to finish" in line
            assert not out.exists()
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait() == 0, a.stderr.read()
    convert_checkpoint(sharded, tmp_path / "alone", 1, max_shard_size="2MB", progress=False)
    assert digest(out) == digest(tmp_path / "alone")
    assert leftovers(out) == []


def test_temp_folders_of_other_hosts_are_left_alone(small, tmp_path):
    """Only this host's temporary folders with a dead PID are removed: another host's, even with a PID that is
    dead here, may be a conversion running there; this host's live ones belong to a running conversion."""
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine_dead = tmp_path / f".out.gqa-tmp-{host_name()}-{dead.pid}"
    mine_live = tmp_path / f".out.gqa-tmp-{host_name()}-{os.getppid()}"
    other_dead = tmp_path / f".out.gqa-tmp-other-host.example-{dead.pid}"
    other_live = tmp_path / f".out.gqa-tmp-other-host.example-{os.getpid()}"
    # Earlier versions wrote no host: `.NAME.gqa-tmp-PID` and `.NAME.gqa-old-PID` are this host's.
    old_format_dead = [tmp_path / f".out.gqa-{kind}-{dead.pid}" for kind in ("tmp", "old")]
    old_format_live = tmp_path / f".out.gqa-tmp-{os.getppid()}"
    for folder in (mine_dead, mine_live, other_dead, other_live, *old_format_dead, old_format_live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    convert_checkpoint(small, out, 1, progress=False)
    assert not mine_dead.exists()
    assert not any(folder.exists() for folder in old_format_dead)
    for folder in (mine_live, other_dead, other_live, old_format_live):
        assert (folder / "model.safetensors").read_bytes() == b"partial"
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


def test_a_lock_file_left_behind(small, tmp_path):
    """A lock file nobody holds: this host's (a killed run) is taken over; another host's is refused, naming
    the host, the PID and the file to remove, since flock may not reach across hosts."""
    out = tmp_path / "out"
    lock = tmp_path / ".out.gqa-lock"
    lock.write_text(f"{host_name()} 999999999\n")
    convert_checkpoint(small, out, 1, progress=False)
    assert out.is_dir() and not lock.exists()
    args = ["convert", str(small), str(tmp_path / "out2"), "-g", "1", "-q"]
    (tmp_path / ".out2.gqa-lock").write_text("other-host.example 4242\n")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    [line] = error_lines(refused.output)
    assert "pid 4242 on host other-host.example" in line and f"remove {tmp_path / '.out2.gqa-lock'}" in line
    assert not (tmp_path / "out2").exists()
    (tmp_path / ".out2.gqa-lock").unlink()
    assert CliRunner().invoke(main, args).exit_code == 0


def test_overwrite_swaps_in_one_step(small, tmp_path, monkeypatch):
    """--overwrite never has a moment without OUTPUT: the old and new folders are exchanged by one rename."""
    out = tmp_path / "out"
    convert_checkpoint(small, out, 2, progress=False)
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real(a, b)))
    convert_checkpoint(small, out, 1, overwrite=True, progress=False)
    assert replaced == []
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------------------
# Process-wide state


def test_a_failed_conversion_restores_torch_threads(small, tmp_path, monkeypatch):
    """Weight-only torch merges run on one torch thread; a run that fails in the middle of merging must hand the
    caller back the thread count it had."""
    import convert.pipeline.writing as writing

    real, seen = writing.convert_layer, []

    def failing(family, merger, layer, *args):
        seen.append(torch.get_num_threads())
        if layer == 1:
            raise ConversionError("injected failure in layer 1")
        return real(family, merger, layer, *args)

    monkeypatch.setattr(writing, "convert_layer", failing)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(ConversionError, match="injected failure"):
            convert_checkpoint(small, tmp_path / "out", 1, "random", progress=False)
        assert seen == [1, 1]  # the merge did run on one thread
        assert torch.get_num_threads() == 3
        assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []
    finally:
        torch.set_num_threads(before)
