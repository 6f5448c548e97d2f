"""bench/bench_ablation.py end to end on a tiny llama: the rows asked for, in order, each reproducible from its
options (the `calibrated` row is exactly `--method calibrated`), and one error line for a bad row name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from convert import convert_checkpoint
from convert.eval.perplexity import score_folder, tokenize_file
from tests.helpers.eval import make, wikitext_folder

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_ablation.py"
SIZES = ["--window", "32", "--windows", "3", "--calibration-tokens", "256", "--calibration-seq-len", "32"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def data(tmp_path) -> Path:
    return wikitext_folder(tmp_path)


def test_rows_and_the_calibrated_row_reproduced(tmp_path, data):
    src = make(tmp_path, "src")
    rows = ["mean", "closed form", "+ two streams (calibrated)"]
    out = tmp_path / "ablation.json"
    r = run("--model", str(src), "-g", "1", "--data-dir", str(data), *SIZES, "--rows", *rows, "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert [x["row"] for x in d["results"]] == ["original", *rows]
    assert [t[0] for t in d["table"]["rows"]] == ["original", *rows]
    assert d["provenance"]["command"].startswith("python bench/bench_ablation.py")
    closed = d["results"][2]
    assert closed["options"]["refit_o"] is False and "--option refit_o=false" in d["table"]["rows"][2][-1]
    # The `calibrated` row is the method with its defaults: the same perplexity as converting it directly.
    report = convert_checkpoint(
        src,
        tmp_path / "direct",
        1,
        "calibrated",
        progress=False,
        method_options=dict(
            calibration_data=str(data / "wikitext-2" / "valid.txt"), calibration_tokens=256, calibration_seq_len=32
        ),
    )
    assert report.kv_heads_after == 1
    from transformers import AutoTokenizer

    ids = tokenize_file(AutoTokenizer.from_pretrained(src), str(data / "wikitext-2" / "test.txt"), 3 * 32 + 1)
    direct = score_folder(tmp_path / "direct", ids, 32, max_windows=3).ppl
    assert d["results"][3]["ppl"] == pytest.approx(direct, rel=1e-6)
    assert d["results"][1]["ppl"] != pytest.approx(direct, rel=1e-3)  # mean is another model


def test_unknown_row_is_one_error_line(tmp_path, data):
    r = run("--data-dir", str(data), "--rows", "nonsense")
    assert r.returncode == 2
    assert "--rows ['nonsense']: choose from mean, closed form" in r.stderr
