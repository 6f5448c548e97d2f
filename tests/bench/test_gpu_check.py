"""bench/gpu_check.sh: refuses --device cuda without a GPU (one line, exit 2); both modes measure 4 contexts.
The dry mode itself (`bash bench/gpu_check.sh --device cpu`) takes minutes: it is run by hand, and its result
kept in bench/results/gpu-<commit>-dry-cpu.json."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_modes_measure_four_context_lengths():
    sizes = load_check().SIZES
    assert sizes["cuda"]["steps"] == 50
    for size in sizes.values():
        assert len(size["contexts"].split(",")) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_error_line():
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --device cuda but torch sees no GPU: run on a GPU machine, or --device cpu (dry mode)"
    )
