"""Calibrated conversion holds one layer at a time: the process does not grow with the number of layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert.methods.runner import FREE_HEAP_FLOOR
from tests.helpers.tiny import save, tiny_model

ROOT = Path(__file__).resolve().parents[2]

# Runs the real CLI (with the heap settings it makes for `convert`) in a fresh process, and reads the process's
# anonymous memory (heap and mmaps, not the mapped files) each time a layer is finished.
CHILD = """
import json, sys
from convert import cli
from convert.methods import calibrated

after_layer = []


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


finish = calibrated.Calibrator.finish


def recorded(self, i, merged, **kwargs):
    out = finish(self, i, merged, **kwargs)
    after_layer.append(rss_anon())
    return out


calibrated.Calibrator.finish = recorded
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(after_layer))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_memory_does_not_grow_with_layers(tmp_path):
    # Layers large enough that their tensors and activations are blocks of a few MB (as at real sizes); 24 of them,
    # so that growth per layer (about 30 MB each before) adds up far beyond the free heap the runner may keep.
    layers = 24
    model = tiny_model(
        "llama",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=512,
    )
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())  # float32, as it calibrates
    src = save(model, tmp_path / "src", shard="20MB")
    del model
    args = ["convert", str(src), str(tmp_path / "out"), "-g", "1", "--method", "calibrated"]
    args += ["--calibration-data", "random", "--calibration-tokens", "2048", "--quiet"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    after = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(after) == layers
    # After the first layers the process has what one layer needs; from then on it may keep up to
    # FREE_HEAP_FLOOR (or a layer, if larger) of freed heap for the next layer, and no more: the bound does not
    # depend on the number of layers (the earlier code grew by about 30 MB every layer, past 600 MB here).
    growth = max(after[3:]) - after[2]
    bound = FREE_HEAP_FLOOR + 2 * layer_bytes
    assert growth < bound, f"anonymous memory after each layer (MB): {[a >> 20 for a in after]}"
