"""`gqa-convert eval`: the numbers that can be checked exactly, through the real command."""

from __future__ import annotations

import json

from click.testing import CliRunner

from convert import convert_checkpoint
from convert.cli import main
from tests.helpers.eval import make, word_tokenizer


def run_eval(*args):
    result = CliRunner().invoke(
        main,
        [
            "eval",
            *map(str, args),
            "--contexts",
            "16,48",
            "--new-tokens",
            "4",
            "--max-windows",
            "3",
            "--window",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tmp_path):
    folder = make(tmp_path, "uniform", zero_head=True)
    (row,) = run_eval(folder)
    assert abs(row["perplexity"] - 160) < 1e-3
    assert row["tokens"] == 3 * 31 and row["windows"] == 3 and row["window"] == 32


def test_kv_bytes_and_ratios_against_the_first_model(tmp_path):
    mha = make(tmp_path, "mha", num_key_value_heads=8)
    convert_checkpoint(mha, tmp_path / "mqa", 1, progress=False)
    word_tokenizer(160).save_pretrained(tmp_path / "mqa")
    rows = run_eval(mha, tmp_path / "mqa")
    # float32, 2 layers, head_dim 8: 2 (K and V) * 2 * heads * 8 * 4 bytes
    assert rows[0]["kv_cache_bytes_per_token"] == 2 * 2 * 8 * 8 * 4
    assert rows[1]["kv_cache_bytes_per_token"] == 2 * 2 * 1 * 8 * 4
    assert rows[1]["ratio_to_first"]["kv_cache_bytes_per_token"] == 1 / 8
    assert [d["context"] for d in rows[0]["decode"]] == [16, 48]
    # The cache measured after decoding holds exactly context + new tokens (minus the last, never fed back).
    for row, heads in zip(rows, (8, 1)):
        for d in row["decode"]:
            assert d["kv_cache_bytes"] == 2 * 2 * heads * 8 * 4 * (d["context"] + d["new_tokens"])
            assert d["tokens_per_s"] > 0 and d["peak_memory_bytes"] > 0


def test_table_output_and_bad_model(tmp_path):
    folder = make(tmp_path, "m")
    result = CliRunner().invoke(
        main, ["eval", str(folder), "--contexts", "16", "--new-tokens", "2", "--window", "32", "--max-windows", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "| model | KV heads | ppl |" in result.output and "1 windows x 32 tokens" in result.output
    bad = CliRunner().invoke(main, ["eval", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no config.json" in bad.output
