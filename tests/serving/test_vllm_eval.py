"""`gqa-convert eval --engine vllm` against `--engine transformers` on the same models and text: the same
perplexity (float32, within 1e-4 relative), a cache of G heads (H / G times the tokens in the same memory), and
decode speeds timed from vLLM's timestamps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from routes import LAYERS, VOCAB, D, H

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "convert.cli", *args], env=env, capture_output=True, text=True)


def tiny_llama_with_tokenizer(folder: Path) -> None:
    """A llama of the lane's shape with a byte-level BPE tokenizer of its vocabulary, trained on pydoc's text."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from convert.text.builtin import builtin_text

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([builtin_text("calibration")], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )
    config = LlamaConfig(
        hidden_size=H * D, intermediate_size=192, num_hidden_layers=LAYERS, num_attention_heads=H,
        num_key_value_heads=H, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.mark.slow
def test_eval_engine_vllm_matches_transformers(tmp_path: Path) -> None:
    tiny_llama_with_tokenizer(tmp_path / "orig")
    done = cli("convert", str(tmp_path / "orig"), str(tmp_path / "g2"), "-g", "2", "-q")
    assert done.returncode == 0, done.stderr
    common = ["--json", "--window", "64", "--max-windows", "3", "--new-tokens", "8"]
    models = [str(tmp_path / "orig"), str(tmp_path / "g2")]
    served = cli("eval", *models, *common, "--contexts", "32,96", "--engine", "vllm", "--kv-memory", "64MiB")
    assert served.returncode == 0, served.stderr[-3000:]
    # perplexity only: the transformers engine's decode timing reads a cache attribute of a later transformers
    # than the one vLLM pins
    reference = cli("eval", *models, *common, "--contexts", "")
    assert reference.returncode == 0, reference.stderr[-3000:]
    served, reference = json.loads(served.stdout), json.loads(reference.stdout)
    for v, t, g in zip(served, reference, (H, 2), strict=True):
        assert v["engine"] == "vllm" and v["num_kv_heads"] == g
        assert (v["tokens"], v["windows"]) == (t["tokens"], t["windows"]) == (189, 3)
        assert abs(v["perplexity"] / t["perplexity"] - 1) < 1e-4
        assert v["kv_cache_bytes_per_token"] == 2 * LAYERS * g * D * 4 == t["kv_cache_bytes_per_token"]
        assert v["dtype"] == t["dtype"] == "float32"
        assert v["cache_tokens"] == (64 << 20) // v["kv_cache_bytes_per_token"]
        assert [d["context"] for d in v["decode"]] == [32, 96] and all(d["tokens_per_s"] > 0 for d in v["decode"])
    assert served[1]["ratio_to_first"]["cache_tokens"] == H / 2
