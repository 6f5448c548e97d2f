"""`gqa-convert eval` on encoder-decoders: span-corruption loss on fixed masks, both caches measured from a fixed
encoder output, and mixtures or tokenizers that cannot be scored refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from convert.cli import main
from convert.eval.seq2seq import SEED, evaluate_seq2seq
from convert.pipeline.conversion import convert_checkpoint
from convert.text.span_corruption import SpanCorruption, corrupt_stream, sentinel_ids
from tests.helpers.uptrain import t5_tokenizer, tiny_llama, tiny_t5, toy_documents, train_tokenizer, write_corpus

OPTIONS = ["--window", "32", "--max-windows", "6", "--contexts", "16,40", "--new-tokens", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-t5")
    docs = toy_documents(120)
    tok = t5_tokenizer(docs)
    t5 = tiny_t5(tok, root / "t5", init_factor=0.5)
    out = {"root": root, "t5": t5, "corpus": write_corpus(root / "corpus.txt", docs), "tokenizer": tok}
    for g in (4, 1):
        convert_checkpoint(t5, root / f"g{g}", g, "mean", progress=False, write_modeling_code=True)
        tok.save_pretrained(root / f"g{g}")
        out[g] = root / f"g{g}"
    return out


def run_eval(*args: str):
    return CliRunner().invoke(main, ["eval", *args, *OPTIONS], catch_exceptions=False)


def test_span_loss_on_fixed_masks_and_both_caches(models):
    result = run_eval(
        str(models["t5"]),
        str(models[4]),
        str(models[1]),
        "--data",
        str(models["corpus"]),
        "--json",
        "--trust-remote-code",
    )
    assert result.exit_code == 0, result.output
    source, same, mqa = json.loads(result.output)
    # G = H changes nothing: the same examples and masks give the same loss to the last bit
    assert same["span_loss"] == source["span_loss"] and same["num_kv_heads"] == 4
    assert mqa["span_loss"] != source["span_loss"] and mqa["num_kv_heads"] == 1
    assert source["perplexity"] == pytest.approx(math.exp(source["span_loss"]))
    assert (source["windows"], source["input_length"], source["target_length"]) == (6, 32, 8)
    assert source["tokens"] == 6 * 8
    # per token: 2 (K, V) x 2 decoder blocks x G heads x d_kv 8 x 4 bytes, for self and for cross alike
    for row, g in ((source, 4), (mqa, 1)):
        assert row["self_cache_bytes_per_token"] == row["cross_cache_bytes_per_token"] == 2 * 2 * g * 8 * 4
        for d in row["decode"]:  # measured: the cross cache holds every input token, self every decoder input
            assert d["cross_cache_bytes"] == d["context"] * row["cross_cache_bytes_per_token"]
            assert d["self_cache_bytes"] == (d["new_tokens"] + 1) * row["self_cache_bytes_per_token"]
            assert d["kv_cache_bytes"] == d["self_cache_bytes"] + d["cross_cache_bytes"]
        assert [d["context"] for d in row["decode"]] == [16, 40]
    assert mqa["ratio_to_first"]["kv_cache_bytes_per_token"] == 0.25


def test_loss_is_the_mean_over_the_target_tokens_of_seeded_examples(models):
    from transformers import AutoModelForSeq2SeqLM

    tok = models["tokenizer"]
    result = evaluate_seq2seq(str(models["t5"]), str(models["corpus"]), window=32, max_windows=3, contexts=())
    span = SpanCorruption(input_length=32)
    ids = tok(models["corpus"].read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    inputs, targets = corrupt_stream(ids, span, sentinel_ids(tok, span.num_spans), tok.eos_token_id, SEED)
    model = AutoModelForSeq2SeqLM.from_pretrained(models["t5"]).eval()
    with torch.no_grad():
        loss = model(input_ids=torch.from_numpy(inputs[:3]), labels=torch.from_numpy(targets[:3])).loss
    assert result.span_loss == pytest.approx(loss.item(), rel=1e-6)


def test_encoder_decoder_and_decoder_only_are_not_mixed(models):
    llama = tiny_llama(train_tokenizer(toy_documents(50)), models["root"] / "llama")
    result = CliRunner().invoke(main, ["eval", str(models["t5"]), str(llama), *OPTIONS])
    assert result.exit_code == 2
    assert "compare encoder-decoder models with each other" in result.output and "(decoder-only)" in result.output


def test_tokenizer_without_sentinels_and_untrusted_code_are_refused(models, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(models["t5"], plain)
    for f in plain.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(toy_documents(50)).save_pretrained(plain)
    result = CliRunner().invoke(main, ["eval", str(plain), "--data", str(models["corpus"]), *OPTIONS])
    assert result.exit_code == 2 and "sentinel tokens" in result.output
    result = CliRunner().invoke(main, ["eval", str(models[1]), "--data", str(models["corpus"]), *OPTIONS])
    assert result.exit_code == 2 and "--trust-remote-code" in result.output
