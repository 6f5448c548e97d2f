"""Real resources (shared text, real weights): skip with a reason when absent, fail when CI requires them."""

from __future__ import annotations

import os

import pytest

REQUIRE_DATA = os.environ.get("GQA_REQUIRE_DATA") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip when a real resource is missing; fail instead when CI requires it."""
    if condition:
        return
    if REQUIRE_DATA:
        pytest.fail(f"{reason} (GQA_REQUIRE_DATA=1 turns this skip into a failure)")
    pytest.skip(reason)
