"""`gqa-convert eval` on inputs that used to be dropped or misread silently: lengths, tokenizers, windows, pairing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from convert.cli import main
from convert.eval.common import Decode, ModelEval
from convert.eval.compare import as_dicts, format_table
from tests.helpers.eval import make, word_tokenizer

REPO = Path(__file__).resolve().parents[2]
FAST = ["--new-tokens", "4", "--window", "32", "--max-windows", "2"]  # tiny models have 256 positions


def invoke(*args) -> CliRunner:
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def test_an_asked_for_context_longer_than_the_positions_is_refused(tmp_path):
    folder = make(tmp_path, "m")
    result = invoke(folder, *FAST, "--contexts", "16,253", "--new-tokens", "4")
    assert result.exit_code == 2
    assert "error: --contexts 253: 253 + 4 new tokens need 257 positions" in result.stderr
    assert "has 256 (max_position_embeddings): use contexts up to 252" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_a_window_longer_than_the_positions_is_refused(tmp_path):
    folder = make(tmp_path, "m")
    result = invoke(folder, "--window", "512", "--contexts", "16", "--new-tokens", "2")
    assert result.exit_code == 2
    assert (
        "--window 512 is longer than" in result.stderr and "(256 positions, max_position_embeddings)" in result.stderr
    )


def test_default_contexts_too_long_are_named_in_a_warning(tmp_path):
    folder = make(tmp_path, "m")
    result = invoke(folder, *FAST, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert [d["context"] for d in row["decode"]] == [128]
    assert "warning: context 512 left out for" in result.stderr and "warning: context 2048 left out" in result.stderr
    assert "512 + 4 new tokens exceed its 256 positions (max_position_embeddings)" in result.stderr
    assert len(row["left_out"]) == 2


def test_a_context_longer_than_the_text_is_refused_by_name(tmp_path):
    folder = make(tmp_path, "m")
    text = tmp_path / "short.txt"
    text.write_text(" ".join(["the"] * 100))  # 100 word tokens
    result = invoke(folder, *FAST, "--data", text, "--contexts", "16,120")
    assert result.exit_code == 2
    assert f"--contexts 120: context 120 needs 120 tokens of text, {text} gave 100" in result.stderr


def test_a_model_folder_without_tokenizer_says_how_to_point_at_one(tmp_path):
    folder = make(tmp_path, "m")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    result = invoke(bare, *FAST, "--contexts", "16")
    assert result.exit_code == 2
    assert f"model folder {bare} has no tokenizer files" in result.stderr and "pass --tokenizer" in result.stderr
    assert "sentencepiece" not in result.output.lower() and "Traceback" not in result.output
    pointed = invoke(bare, *FAST, "--contexts", "16", "--tokenizer", folder, "--json")
    assert pointed.exit_code == 0, pointed.output
    assert json.loads(pointed.stdout)[0]["windows"] == 2


def test_max_windows_zero_scores_every_window(tmp_path):
    folder = make(tmp_path, "m")
    vocab = [w for w in word_tokenizer(160).get_vocab() if not w.startswith("<")]
    text = tmp_path / "long.txt"
    text.write_text(" ".join(vocab[i % len(vocab)] for i in range(32 * 70 + 5)))  # one token per word
    result = invoke(folder, "--data", text, "--window", "32", "--max-windows", "0", "--contexts", "", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["windows"] == 70 and row["tokens"] == 70 * 31  # more than the 64 windows once read at most


def decode(context: int, rate: float) -> Decode:
    return Decode(context, 4, rate, 0, 0)


def model_eval(name: str, decodes: list[Decode]) -> ModelEval:
    return ModelEval(name, "llama", 1, 8, 8, "float32", 64, 10.0, 100, 2, 32, 32, decodes)


def test_decode_rows_pair_by_context_not_position():
    base = model_eval("mha", [decode(128, 10.0), decode(512, 5.0)])
    other = model_eval("mqa", [decode(512, 20.0)])  # left 128 out
    rows = as_dicts([base, other])
    assert rows[1]["decode"][0]["context"] == 512 and rows[1]["decode"][0]["speedup_vs_first"] == 4.0
    table = format_table([base, other])
    assert "| mqa | 8 | 10.00 | 1.00 | 64 | 1.00 | - | 20.0 (4.00×) |" in table
    only_other = as_dicts([other, base])  # a context the first model lacks has no ratio
    assert only_other[1]["decode"][0]["speedup_vs_first"] is None


@pytest.mark.slow
def test_the_eval_command_triggers_no_deprecation_warning(tmp_path):
    folder = make(tmp_path, "m")
    result = subprocess.run(
        [sys.executable, "-c", "from convert.cli import main; main()", "eval", str(folder), *FAST, "--contexts", "16"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "deprecat" not in result.stderr.lower(), result.stderr
