"""bench/bench_efficiency.py: the crossing arithmetic on exact small inputs, and the quick run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_efficiency.py"


def load_math():
    spec = importlib.util.spec_from_file_location("efficiency_math", ROOT / "bench" / "efficiency_math.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crossing_is_interpolated_in_log_alpha():
    m = load_math()
    # gap 10 at 1%, -10 at 4%: the middle in log alpha is the geometric mean, 2%
    c = m.crossing([0.0, 0.01, 0.04], [150.0, 120.0, 100.0], [110.0] * 3)
    assert c["how"] == "interpolated" and c["between"] == [0.01, 0.04]
    assert math.isclose(c["alpha"], 0.02, rel_tol=1e-12)
    # gap 30 at 1%, -10 at 10%: three quarters of the way in log10 alpha, 10 ** -1.25
    c = m.crossing([0.01, 0.10], [140.0, 100.0], [110.0, 110.0])
    assert math.isclose(c["alpha"], 10**-1.25, rel_tol=1e-12)


def test_crossing_edge_cases():
    m = load_math()
    assert m.crossing([0.0, 0.01], [105.0, 100.0], [110.0, 110.0]) == {
        "alpha": 0.0,
        "how": "at alpha = 0",
        "between": None,
    }
    # from 0 to the first trained point log alpha has no left end: an upper bound
    assert m.crossing([0.0, 0.01, 0.05], [200.0, 109.0, 100.0], [110.0] * 3) == {
        "alpha": 0.01,
        "how": "at most",
        "between": [0.0, 0.01],
    }
    assert m.crossing([0.0, 0.01, 0.05], [200.0, 150.0, 110.0], [110.0] * 3)["how"] == "at a grid point"
    assert m.crossing([0.05, 0.0, 0.01], [120.0, 200.0, 150.0], [110.0] * 3) == {
        "alpha": None,
        "how": "not reached",
        "between": [0.05, 0.05],
    }
    # a goal that moves with the control: 1.05 x control at each alpha
    c = m.crossing([0.01, 0.04], [115.0, 100.0], [1.05 * 100.0, 1.05 * 100.0])  # gaps 10 and -5: 2/3 of the way
    assert math.isclose(c["alpha"], math.exp(math.log(0.01) + math.log(4) * 2 / 3), rel_tol=1e-12)
    with pytest.raises(ValueError, match="one ppl and one target per alpha"):
        m.crossing([0.0, 0.01], [1.0], [1.0, 1.0])
    assert m.first_within([512, 0, 1024], [50.0, 90.0, 40.0], 45.0) == 1024
    assert m.first_within([0, 512], [90.0, 50.0], 45.0) is None
    assert m.first_within([0, 512, 1024], [90.0, 50.0, 40.0], [80.0, 52.5, 30.0]) == 512  # a goal per point
    with pytest.raises(ValueError, match="one ppl and one target per token count"):
        m.first_within([0, 512], [90.0, 50.0], [1.0])
    assert m.pct(0.0025) == "0.25%" and m.pct(None) == "-" and m.pct(0.0) == "0"


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, wikitext_valid, wikitext_test):
    """--quick: the tiny replication llama pretrained, converted by mean and calibrated, uptrained at 1% and 5% with
    and without the teacher, the control beside them; the JSON holds the curves, the crossings and the tables."""
    out = tmp_path / "eff.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--work",
        str(tmp_path / "work"),
        "--data",
        str(wikitext_valid),
        "--test",
        str(wikitext_test),
        "--output",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    L = d["llama"]
    assert set(L["curves"]) == {"mean", "calibrated", "calibrated+kd"}
    for pts in L["curves"].values():
        assert [p["alpha"] for p in pts] == [0.0, 0.01, 0.05]
        assert all(p["ppl"] > 1 for p in pts)
    # calibrated + distillation starts where calibrated starts (the same conversion), then trains differently
    assert L["curves"]["calibrated+kd"][0]["ppl"] == L["curves"]["calibrated"][0]["ppl"]
    assert L["curves"]["calibrated+kd"][2]["ppl"] != L["curves"]["calibrated"][2]["ppl"]
    assert [c["alpha"] for c in L["control"]] == [0.0, 0.01, 0.05] and L["control"][0]["ppl"] == L["mha_ppl"]
    assert math.isclose(L["goal_ppl"], 1.05 * L["mha_ppl"])
    for c in L["crossing"].values():
        assert set(c) == {"vs_original", "vs_control"}
    assert len(d["table"]["rows"]) == 2 + 3 and d["table"]["rows"][0][0].startswith("[DHA")
    assert d["provenance"]["command"].startswith("python bench/bench_efficiency.py --quick")
    # a second run reuses every cell
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["llama"]["curves"] == L["curves"]


def test_bad_parts_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--parts", "gpt"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --parts takes llama and/or smollm2")
