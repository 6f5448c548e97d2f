"""bench/replicate_paper.py: the quick replication end to end (CI smoke test), its command line on bad input, and
its analysis (bench/replication_analysis.py) on known numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "replicate_paper.py"


def load_script():
    """The analysis module: pure functions of results.json, importable without the bench folder on sys.path."""
    spec = importlib.util.spec_from_file_location("replication_analysis", ROOT / "bench" / "replication_analysis.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def refused(args: list[str]) -> str:
    """The script on bad input, as a user runs it: exit status 2 and the message on stderr."""
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_quick_replication_end_to_end(tmp_path, wikitext_valid, wikitext_test):
    """--quick: pretrain a tiny llama from scratch, convert to MQA by mean and random, uptrain 5%, score on test."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--out",
        str(out),
        "--work",
        str(work),
        "--data",
        str(wikitext_valid),
        "--test",
        str(wikitext_test),
        "--json",
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)

    for name in ("results.json", "results.md", "fig_methods.png", "fig_alpha.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("fig_methods.png", "fig_alpha.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results == printed

    # pretraining ran through the recipe and its tokens are the reference for alpha
    pre = results["pretrain"]
    assert pre["tokens"] >= results["config"]["pretrain_tokens"] and pre["steps"] > 0
    assert math.isfinite(pre["ppl"]) and math.isfinite(pre["init_ppl"])
    assert pre["ppl"] < 0.5 * pre["init_ppl"], "pretraining must beat the random init by far"

    rows = results["rows"]
    cells = {(r["kind"], r["groups"], r["method"], r["alpha"]) for r in rows}
    assert cells == {
        ("mha", 4, "-", 0.0),
        ("gqa", 1, "mean", 0.0),
        ("gqa", 1, "mean", 0.05),
        ("gqa", 1, "random", 0.0),
        ("gqa", 1, "random", 0.05),
    }
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1, r
        if r["kind"] == "gqa" and r["alpha"] > 0:
            # alpha x pretraining tokens, rounded up to whole steps of the recipe
            step = results["config"]["micro_batch_size"] * results["config"]["block_size"]
            assert r["alpha"] * pre["tokens"] <= r["uptrain_tokens"] < r["alpha"] * pre["tokens"] + step
        if r["kind"] == "gqa" and r["alpha"] == 0:
            assert r["uptrain_tokens"] == 0
    # uptraining a mean-pooled MQA model helps
    by = {(r["method"], r["alpha"]): r["ppl"] for r in rows if r["kind"] == "gqa"}
    assert by[("mean", 0.05)] < by[("mean", 0.0)]

    table = (out / "results.md").read_text()
    for row in ("| random init (no training) |", "| MHA (pretrained", "| MQA mean | 1 |", "| MQA random | 1 |"):
        assert row in table, row
    assert "α = 0%" in table and "α = 5%" in table
    assert "Wall time:" in table and "Command: `python bench/replicate_paper.py --quick" in table
    assert {c["claim"].split(",")[0] for c in results["claims"]}  # the verdicts are written, whatever they are
    assert all(c["holds"] in (True, False, None) for c in results["claims"])

    # a second run reuses every finished cell and gives the same numbers
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout)
    assert second["cells_reused"] == len(rows)  # the pretrained model and every grid cell
    assert [r["ppl"] for r in second["rows"]] == [r["ppl"] for r in rows]


@pytest.mark.slow
def test_quick_t5_replication_end_to_end(tmp_path, wikitext_valid, wikitext_test):
    """--arch t5 --quick: a tiny T5.1.1 pretrained with span corruption, converted to MQA (mean, random; shipped
    gqa_t5 code), uptrained 5% in input + target tokens, scored on held-out span corruption."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--arch", "t5", "--quick", "--out", str(out), "--work", str(tmp_path / "work")]
    cmd += ["--data", str(wikitext_valid), "--test", str(wikitext_test), "--json", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for name in ("results.json", "results.md", "fig_methods.png", "fig_alpha.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert results["config"]["arch"] == "t5" and results["methods"] == ["mean", "random"]
    pre, ev = results["pretrain"], results["eval"]
    assert pre["ppl"] < 1e-3 * pre["init_ppl"], "pretraining must beat the random init by far"
    assert (ev["window"], ev["target_length"], ev["windows"]) == (64, 14, 48)  # T5 lengths for inputs of 64
    assert ev["tokens_scored"] == 48 * 14
    row_tokens = 64 + 14  # a span-corruption row counts its inputs and its targets
    assert pre["tokens"] % (results["config"]["micro_batch_size"] * row_tokens) == 0
    cells = {(r["kind"], r["groups"], r["method"], r["alpha"]): r for r in results["rows"]}
    assert set(cells) == {
        ("mha", 4, "-", 0.0),
        ("gqa", 1, "mean", 0.0),
        ("gqa", 1, "mean", 0.05),
        ("gqa", 1, "random", 0.0),
        ("gqa", 1, "random", 0.05),
    }
    step = results["config"]["micro_batch_size"] * row_tokens
    for r in results["rows"]:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1, r
        if r["kind"] == "gqa" and r["alpha"] > 0:
            assert r["alpha"] * pre["tokens"] <= r["uptrain_tokens"] < r["alpha"] * pre["tokens"] + step
    assert cells[("gqa", 1, "mean", 0.05)]["ppl"] < cells[("gqa", 1, "mean", 0.0)]["ppl"]  # uptraining helps
    table = (out / "results.md").read_text()
    assert "Model: T5.1.1 (gated-gelu, untied head" in table and "Held-out span-corruption perplexity" in table
    assert "| MQA mean | 1 |" in table and "--arch t5 --quick" in table


def test_bad_input_is_a_clear_error(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello world\n")
    err = refused(["--quick", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nope.txt")])
    assert "nope.txt not found" in err
    assert "held-out" in refused(["--quick", "--out", str(tmp_path / "out"), "--data", str(text), "--test", str(text)])
    assert "--groups [3]" in refused(["--out", str(tmp_path / "out"), "--data", str(text), "--groups", "3"])
    err = refused(["--arch", "t5", "--out", str(tmp_path / "out"), "--data", str(text), "--block-size", "2"])
    assert "--block-size is the T5 input length" in err
    assert not (tmp_path / "out").exists()


def test_alpha_parsing():
    script = load_script()
    assert script.parse_alpha("5%") == pytest.approx(0.05)
    assert script.parse_alpha("0.1") == pytest.approx(0.1)
    assert script.parse_list("0,1%,5%", script.parse_alpha, "alphas") == pytest.approx([0, 0.01, 0.05])


def _agg(script, table: dict) -> dict:
    rows = []
    for (kind, g, method, alpha), ppls in table.items():
        for seed, ppl in enumerate(ppls if isinstance(ppls, list) else [ppls]):
            rows.append({"kind": kind, "groups": g, "method": method, "alpha": alpha, "seed": seed, "ppl": ppl})
    return script.aggregate(rows)


def test_claims_on_known_numbers():
    """The verdicts follow the stated thresholds: ranking, usable (<= 1.5x MHA), diminishing returns, close (<= 5%)."""
    script = load_script()
    cfg = script.Config(
        groups=[1, 4], methods=["mean", "first", "random"], alphas=[0.0, 0.01, 0.05, 0.10], control=False
    )
    paper_like = {("mha", 8, "-", 0.0): 20.0}
    for g, start in ((1, 200.0), (4, 25.0)):
        for m, extra in (("mean", 0.0), ("first", 1.0), ("random", 3.0)):
            paper_like[("gqa", g, m, 0.0)] = start * (1 + extra)
            paper_like[("gqa", g, m, 0.01)] = 24.0 + extra
            paper_like[("gqa", g, m, 0.05)] = 20.5 + extra
            paper_like[("gqa", g, m, 0.10)] = 20.3 + extra
    paper_like[("gqa", 4, "mean", 0.05)] = [20.4, 20.6]  # two seeds
    claims = script.check_claims(_agg(script, paper_like), cfg, cfg.methods)
    assert [c["holds"] for c in claims] == [True, True, True, True]

    broken = dict(paper_like)
    broken[("gqa", 1, "random", 0.05)] = 20.0  # random beats mean for MQA at 5%
    broken[("gqa", 4, "mean", 0.0)] = 40.0  # GQA-4 at 2x MHA right after conversion: not usable
    broken[("gqa", 4, "mean", 0.10)] = 10.0  # most of the gain comes after 5%
    claims = script.check_claims(_agg(script, broken), cfg, cfg.methods)
    assert [c["holds"] for c in claims] == [False, False, False, True]
    assert any("order broken" in d for d in claims[0]["details"])

    agg = _agg(script, paper_like)
    cell = agg[("gqa", 4, "mean", 0.05)]
    assert cell["n"] == 2 and cell["spread"] == pytest.approx(0.1)
    assert cell["ppl"] == pytest.approx(math.sqrt(20.4 * 20.6))
