"""The settings of large runs (attention kernel, optimizer, torch.compile, FSDP's unit): what cannot run here is
refused before compute by name; torch.compile on CPU trains the same steps; every output class has blocks to wrap."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from convert.uptrain import loop as uptrain_lib
from convert.uptrain.sharding import merge_shared_embeddings, own_blocks, wrap_classes
from convert.uptrain.speed import fused_supported, optimizer_name
from tests.helpers.uptrain import REPO, ok, recipe_env, tiny_llama, toy_documents, train_tokenizer, write_corpus

RECIPE = REPO / "recipes" / "uptrain.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("speed")
    docs = toy_documents(80)
    tok = train_tokenizer(docs)
    return {"model": tiny_llama(tok, root / "llama"), "corpus": write_corpus(root / "corpus.txt", docs)}


def fails(capsys, args: list[str]) -> str:
    code = uptrain_lib.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    return err[err.index("error: ") :].strip()


def common(assets, tmp_path) -> list[str]:
    return [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={tmp_path / 'out'}", "max_steps=1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these kernels may be installed")
def test_attention_kernels_that_cannot_train_here_are_refused(assets, tmp_path, capsys):
    err = fails(capsys, [*common(assets, tmp_path), "attn_implementation=flash_attention_2"])
    assert err == (
        "error: attn_implementation=flash_attention_2 is not available here: it needs a CUDA GPU and pip install "
        "flash-attn --no-build-isolation; or set attn_implementation: sdpa"
    )
    err = fails(capsys, [*common(assets, tmp_path), "attn_implementation=flex_attention"])
    assert "flex_attention is not available here: it needs a CUDA GPU" in err and "backward" in err
    assert "attn_implementation must be one of sdpa, eager" in fails(
        capsys, [*common(assets, tmp_path), "attn_implementation=fast"]
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_the_8bit_optimizer_without_bitsandbytes_is_refused(assets, tmp_path, capsys):
    err = fails(capsys, [*common(assets, tmp_path), "optimizer=adamw_8bit"])
    assert err == (
        "error: optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes (on a CUDA GPU), "
        "or set optimizer: adamw"
    )


def test_fused_adamw_where_the_device_has_it():
    from convert.uptrain.settings import make_settings

    s = make_settings({"model": "m", "data": "d", "output_dir": "o", "max_steps": 1})
    assert fused_supported(torch.device("cuda")) and not fused_supported(torch.device("cpu"))
    assert optimizer_name(s, torch.device("cuda")) == "AdamW, fused"
    assert optimizer_name(s, torch.device("cpu")) == "AdamW"


def test_a_wrap_class_the_model_lacks_is_refused_by_name(assets, tmp_path, capsys, monkeypatch):
    err = fails(capsys, [*common(assets, tmp_path), "fsdp_wrap=[PhiDecoderLayer]"])
    assert err == (
        "error: fsdp_wrap names PhiDecoderLayer, which the model (LlamaForCausalLM) does not have; its blocks are "
        "LlamaDecoderLayer: remove that line (the recipe then wraps the model's own blocks) or set fsdp_wrap to "
        "one of them"
    )
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an old accelerate config naming another family's block
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "GPTNeoXLayer")
    err = fails(capsys, common(assets, tmp_path))
    assert err.startswith("error: the accelerate config's fsdp_transformer_layer_cls_to_wrap names GPTNeoXLayer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("model_type", "block"),
    [
        ("llama", "LlamaDecoderLayer"),
        ("qwen2", "Qwen2DecoderLayer"),
        ("mistral", "MistralDecoderLayer"),
        ("phi", "PhiDecoderLayer"),
        ("nemotron", "NemotronDecoderLayer"),
        ("gpt_bigcode", "GPTBigCodeBlock"),
        ("falcon", "FalconDecoderLayer"),
        ("gpt2", "GPT2Block"),  # what the shipped gqa_gpt2 class inherits
        ("bloom", "BloomBlock"),  # and gqa_bloom
    ],
)
def test_every_output_class_declares_its_blocks(model_type, block, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers.tiny import tiny_config

    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    if model_type in ("gpt2", "bloom"):
        config = AutoConfig.for_model(model_type, vocab_size=64, n_layer=2, n_head=4, **{"n_embd": 32})
    else:
        config = tiny_config(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert own_blocks(model) == [block]
    assert wrap_classes(model, None) == [block]


def test_t5_embeddings_become_one_module_with_the_same_weights_and_keys():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config).eval()
    keys, ids = list(model.state_dict()), torch.tensor([[3, 4, 5]])
    before = model(input_ids=ids, decoder_input_ids=ids).logits
    assert merge_shared_embeddings(model) == 2
    assert model.encoder.embed_tokens is model.shared and model.decoder.embed_tokens is model.shared
    assert list(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, before)
    assert own_blocks(model) == ["T5Block"]


@pytest.mark.slow
def test_torch_compile_on_cpu_trains_the_same_steps(assets, tmp_path):
    args = [
        f"model={assets['model']}",
        f"data={assets['corpus']}",
        "max_steps=3",
        "block_size=32",
        "micro_batch_size=2",
        "max_eval_blocks=2",
        "eval_every=0",
        "report_to=none",
    ]
    out = {}
    for name, extra in (("plain", []), ("compiled", ["torch_compile=true"])):
        result = subprocess.run(
            [sys.executable, str(RECIPE), *args, *extra, f"output_dir={tmp_path / name}"],
            capture_output=True,
            text=True,
            env=recipe_env(),
            cwd=REPO,
            timeout=600,
        )
        ok(result)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = ({r["step"]: r["loss"] for r in rows if r["kind"] == "train"}, result.stdout)
    assert "torch.compile (inductor)" in out["compiled"][1] and "torch.compile" not in out["plain"][1]
    plain, compiled = out["plain"][0], out["compiled"][0]
    assert sorted(compiled) == [1, 2, 3]
    assert max(abs(compiled[s] - plain[s]) for s in plain) <= 1e-4, (compiled, plain)
