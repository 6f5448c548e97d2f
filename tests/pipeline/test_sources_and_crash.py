"""SOURCE as a hub id resolved from a real local hub cache (offline), and a converter killed with SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from convert.cli import main
from tests.helpers.hub import fake_hub_cache
from tests.helpers.tiny import save, tiny_model


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    src = save(tiny_model("qwen2"), tmp_path / "src")
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "tiny-org/tiny-qwen2", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "tiny-org/tiny-qwen2", str(tmp_path / "out"), "-g", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "tiny-org/tiny-qwen2" in result.output
    assert "base_model: tiny-org/tiny-qwen2" in (tmp_path / "out" / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_key_value_heads == 2
    missing = runner.invoke(main, ["convert", "tiny-org/not-cached", str(tmp_path / "out2"), "-g", "2"])
    assert missing.exit_code == 2 and "not in the local hub cache" in missing.output
    assert not (tmp_path / "out2").exists()


def test_sigkill_leaves_no_output_and_an_intact_source(tmp_path):
    # Large enough (~170 MB float32) that the kill lands while shards are being written.
    model = tiny_model(
        "llama",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=8000,
    )
    src = save(model, tmp_path / "src", shard="40MB")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "convert.cli",
        "convert",
        str(src),
        str(out),
        "-g",
        "1",
        "-q",
        "--max-shard-size",
        "20MB",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    killed_mid_write = False
    while time.time() < deadline and proc.poll() is None:
        tmp = list(tmp_path.glob(".out.gqa-tmp-*"))
        if tmp and len(list(tmp[0].glob("*.safetensors"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_mid_write, f"the converter finished before it could be killed: {proc.stderr.read()!r}"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()} == before
    # The next run removes the dead run's temporary folder and completes.
    leftovers = list(tmp_path.glob(".out.gqa-tmp-*"))
    assert leftovers
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(p.exists() for p in leftovers)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


def test_a_failing_background_copy_fails_the_conversion_cleanly(tmp_path, monkeypatch):
    """Pass-through tensors are copied on background threads; an error there must stop the run like any other:
    the message, exit 2, no OUTPUT, no temporary folder, no file descriptor left open."""
    import convert.io.safetensors as tio

    src = save(tiny_model("llama"), tmp_path / "src", shard="100KB")
    real_copy, calls = tio.copy_raw, []

    def flaky_copy(info, out_fd, out_offset, writeback=False):
        calls.append(info)
        if len(calls) == 5:
            raise tio.ConversionError(f"{info.file} ended early: the file is truncated; re-download it")
        real_copy(info, out_fd, out_offset, writeback)

    monkeypatch.setattr(tio, "copy_raw", flaky_copy)
    fds_before = len(os.listdir("/proc/self/fd"))
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "-g", "1", "-q"])
    assert result.exit_code == 2, result.output
    assert "ended early: the file is truncated" in result.output
    assert len(calls) >= 5
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.gqa-tmp-*"))
    assert len(os.listdir("/proc/self/fd")) == fds_before
    monkeypatch.setattr(tio, "copy_raw", real_copy)
    ok = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "-g", "1", "-q"])
    assert ok.exit_code == 0, ok.output


def test_hub_snapshot_of_links_with_a_published_config(tmp_path):
    """SOURCE as people have it after a download: a hub snapshot folder whose files are links into blobs/, with
    config.json as the hub has it (Llama-2 style). The output holds real files; the blobs are untouched."""
    from tests.helpers.hub import save_hub_style

    save_hub_style("Llama-2-7b", tmp_path / "files", groups=2)
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/llama-2-style", tmp_path / "files")
    snapshot = cache / "models--org--llama-2-style" / "snapshots" / ("a" * 40)
    assert all(p.is_symlink() for p in snapshot.iterdir())
    blobs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (snapshot.parent.parent / "blobs").iterdir()}
    result = CliRunner().invoke(main, ["convert", str(snapshot), str(tmp_path / "out"), "-g", "2", "-q"])
    assert result.exit_code == 0, result.output
    files = list((tmp_path / "out").iterdir())
    assert files and not any(p.is_symlink() for p in files)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_key_value_heads == 2
    assert {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (snapshot.parent.parent / "blobs").iterdir()
    } == blobs
