"""Every route's output served in vLLM next to transformers (float32): the same prompt log-probs (within 1e-4),
the same greedy tokens, and a KV cache of G heads: at a fixed memory it holds memory / (G-head bytes per token).

One subprocess (serve_routes.py) builds, converts and serves every route; each test reads its route's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from routes import BY_NAME, LAYERS, ROUTES, D

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("serving")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "serve_routes.py"), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    path = work / "results.json"
    assert path.is_file(), f"serve_routes.py wrote no results (exit {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(path.read_text())


def result(served: dict, name: str) -> dict:
    r = served[name]
    assert "error" not in r, r.get("traceback", r.get("error"))
    return r


@pytest.mark.parametrize("name", [r.name for r in ROUTES])
def test_route_serves_like_transformers(served: dict, name: str) -> None:
    r = result(served, name)
    assert r["output_model_type"] == BY_NAME[name].output_model_type
    want, got = r["reference"], r["vllm"]
    for a, b in zip(want["prompt_logprobs"], got["prompt_logprobs"], strict=True):
        assert len(a) == len(b)
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    assert got["tokens"] == want["tokens"]


@pytest.mark.parametrize("name", [r.name for r in ROUTES])
def test_route_cache_holds_g_heads(served: dict, name: str) -> None:
    """vLLM's cache at the fixed memory holds as many whole blocks as fit memory / (2 (K and V) x layers x G x d x
    4 bytes) tokens; where the memory is a whole number of blocks at H heads too (every route but the 6-head one),
    that is exactly H / G times the tokens the same memory holds for H heads."""
    r = result(served, name)
    route, got = BY_NAME[name], r["vllm"]
    assert (got["num_kv_heads"], got["head_size"], got["num_layers"]) == (route.num_kv_heads, D, LAYERS)
    per_token = 2 * LAYERS * route.num_kv_heads * D * 4
    assert got["kv_blocks"] == r["kv_bytes"] // (got["block_size"] * per_token)
    at_h = 2 * LAYERS * route.heads * D * 4 * got["block_size"]
    if r["kv_bytes"] % at_h == 0:
        tokens = got["kv_blocks"] * got["block_size"]
        assert (
            tokens
            == r["kv_bytes"] // per_token
            == route.heads // route.num_kv_heads * (r["kv_bytes"] // at_h) * (got["block_size"])
        )
    else:
        assert name == "bloom-shipped-6-heads"


def test_alibi_routes_are_served_by_the_plugin(served: dict) -> None:
    """bloom and mpt go through gqa-convert's vLLM plugin (ALiBi slopes in vLLM's attention); gpt2 and opt through
    vLLM's own Transformers backend."""
    assert result(served, "bloom-shipped")["vllm"]["architecture"] == "GQABloomForCausalLM"
    assert result(served, "bloom-shipped-6-heads")["vllm"]["architecture"] == "GQABloomForCausalLM"
    assert result(served, "mpt-shipped")["vllm"]["architecture"] == "GQAMptForCausalLM"
    assert result(served, "gpt2-shipped")["vllm"]["architecture"] == "TransformersForCausalLM"
    assert result(served, "opt-shipped")["vllm"]["architecture"] == "TransformersForCausalLM"
