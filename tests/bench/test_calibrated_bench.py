"""bench/bench_calibrated.py --ratio on a tiny llama: the conversions it times are the calibrated methods --methods
names, and the table renderer words the cost line for what was timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.eval import make, wikitext_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path) -> Path:
    return wikitext_folder(tmp_path)


@pytest.mark.parametrize(
    ("methods", "timed"),
    [(["reconstructed"], {"reconstructed"}), (["calibrated"], {"calibrated"}), (["mean"], {"calibrated"})],
)
def test_ratio_times_the_methods_asked_for(tmp_path, data, monkeypatch, methods, timed):
    src = make(tmp_path, "src")
    args = ["--model", str(src), "--data-dir", str(data), "--calibration-tokens", "512", "--windows", "2"]
    cmd = [sys.executable, str(ROOT / "bench" / "bench_calibrated.py"), *args, "--ratio", "--json"]
    r = subprocess.run([*cmd, "--methods", *methods], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    ratio = d["ratio"]
    assert ("ratio" in ratio) == ("calibrated" in timed)
    assert ("ratio_reconstructed" in ratio) == ("reconstructed" in timed)
    assert ratio["tokens"] == 512 and ratio["forward_float32_s"] > 0
    assert [x["method"] for x in d["results"]] == [
        "original",
        *({"calibrated": "calibrated contiguous"}.get(m, m) for m in methods),
    ]
    sys.path.insert(0, str(ROOT / "bench"))
    import tables

    (tmp_path / "x.json").write_text(json.dumps(d))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    cost = next(line for line in tables.render("x.json", tmp_path / "page.md").splitlines() if line.startswith("Cost"))
    assert cost.startswith("Cost: one float32 forward pass over the same 512 tokens took")
    assert ("the calibrated conversion" in cost) == ("calibrated" in timed)
    assert ("`--method reconstructed`" in cost) == ("reconstructed" in timed)
