"""FSDP2 on CPU for one output of every class gqa-convert writes, with the shipped config unchanged.

recipes/accelerate_fsdp_cpu.yaml names no block class: the recipe wraps each model's own blocks. For each class
three real launches: one process (the reference), two FSDP processes SIGKILLed (rank 0) as the last checkpoint's
trainer_state.json is opened, and their `resume: auto` from the checkpoint before it. Checked per class: the 2
processes give the one-process losses and weights within 1e-5, the resumed steps repeat the killed run's exactly,
and the result loads with `from_pretrained` as the converted class.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from convert import convert_checkpoint
from tests.helpers.uptrain import ok, t5_tokenizer, tiny_t5, toy_documents, train_tokenizer, write_corpus
from tests.uptrain.test_fsdp import LOSS_TOLERANCE, fsdp, losses, one_process

# 4 steps of a global batch of 4 blocks (2 x 2 processes, or 2 x 2 accumulated on one); checkpoints at 2 and 4.
RUN = [
    "block_size=32",
    "lr=3e-3",
    "warmup_steps=1",
    "seed=0",
    "max_eval_blocks=2",
    "eval_every=0",
    "save_every=2",
    "keep_checkpoints=2",
    "max_steps=4",
    "micro_batch_size=2",
    "report_to=none",
    "--quiet",
]
SPAN = ["objective=span_corruption"]  # block_size 32 inputs + 8 targets a row
KILL = {"op": "open", "path": "checkpoints/.tmp-step-000004/trainer_state.json", "nth": 0, "how": "before"}
NEOX = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, rotary_pct=0.5)
GPT2 = dict(n_embd=64, n_layer=2, n_head=8, n_inner=96, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
QWEN2 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
# output class[-variant] -> (source model_type, source config, KV heads out, block class wrapped, extra settings)
CLASSES: dict[str, tuple[str, dict, int, str, list[str]]] = {
    "qwen2": ("qwen2", QWEN2, 2, "Qwen2DecoderLayer", []),
    "qwen2-lora": ("qwen2", QWEN2, 2, "Qwen2DecoderLayer", ["train=lora", "lora_r=4"]),  # peft under FSDP2
    "phi": ("gpt_neox", {**NEOX, "use_parallel_residual": True}, 2, "PhiDecoderLayer", []),
    "nemotron": ("gpt_neox", {**NEOX, "use_parallel_residual": False}, 2, "NemotronDecoderLayer", []),
    "gpt_bigcode": ("gpt2", GPT2, 1, "GPTBigCodeBlock", []),
    "gqa_gpt2": ("gpt2", GPT2, 2, "GPT2Block", ["trust_remote_code=true"]),
    "gqa_t5": ("t5", {}, 1, "T5Block", [*SPAN, "trust_remote_code=true"]),
}


def source(kind: str, tokenizer, folder: Path) -> Path:
    """A tiny source checkpoint of `kind` with its tokenizer; norms and biases moved off their init."""
    model_type, kwargs, *_ = CLASSES[kind]
    if model_type == "t5":
        return tiny_t5(tokenizer, folder, d_model=32, init_factor=0.5)
    size = "n_positions" if model_type == "gpt2" else "max_position_embeddings"
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{size: 64, **kwargs},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def killed_then_resumed(common: list[str], out: Path) -> dict:
    """The FSDP run killed in its last checkpoint, its metrics as the kill left them, and its resume."""
    killed = fsdp([*common, f"output_dir={out}"], KILL)
    left = {
        "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir()),
        "model": (out / "model").exists(),
        "losses": losses(out),
    }
    resumed = fsdp([*common, f"output_dir={out}", "resume=auto"])
    return {"killed": killed, "left": left, "resumed": resumed}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp-classes")
    docs = toy_documents(120)
    tokenizers = {"causal": train_tokenizer(docs), "t5": t5_tokenizer(docs)}
    corpus = write_corpus(root / "corpus.txt", docs)
    jobs, pool = {}, ThreadPoolExecutor(max_workers=3)
    for kind, (model_type, _, groups, _, extra) in CLASSES.items():
        tok = tokenizers["t5" if model_type == "t5" else "causal"]
        src = source(kind, tok, root / kind / "source")
        model = root / kind / "converted"
        shipped = kind.startswith("gqa_")  # the shipped-code route
        convert_checkpoint(src, model, groups, progress=False, write_modeling_code=shipped)
        tok.save_pretrained(model)
        common = [f"model={model}", f"data={corpus}", *RUN, *extra]
        jobs[kind] = {
            "one": pool.submit(one_process, [*common, f"output_dir={root / kind / 'one'}"]),
            "fsdp": pool.submit(killed_then_resumed, common, root / kind / "fsdp"),
        }
    results = {kind: {k: j.result() for k, j in both.items()} for kind, both in jobs.items()}
    pool.shutdown()
    yield {"root": root, "results": results}
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CLASSES))
def test_two_fsdp_processes_match_one_and_a_killed_run_resumes_exactly(runs, kind):
    root, result = runs["root"] / kind, runs["results"][kind]
    ok(result["one"])
    assert result["fsdp"]["killed"].returncode != 0
    left = result["fsdp"]["left"]
    assert left["checkpoints"] == [".tmp-step-000004", "step-000002"] and not left["model"], left
    resumed = ok(result["fsdp"]["resumed"])
    out = root / "fsdp"
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000002"), resumed.stdout
    assert summary["num_processes"] == 2 and summary["global_batch"] == 4
    got, before_kill, expected = losses(out), left["losses"], losses(root / "one")
    assert sorted(got) == sorted(expected) == sorted(before_kill) == [1, 2, 3, 4]
    assert got == before_kill  # steps 3-4 recomputed after the resume: the same floats as before the kill
    assert max(abs(got[s] - expected[s]) for s in expected) <= LOSS_TOLERANCE, (got, expected)
    shards = sorted(p.name for p in (out / "checkpoints" / "step-000004" / "pytorch_model_fsdp_0").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # sharded: one file per rank
    want = load_file(str(root / "one" / "model" / "model.safetensors"))
    have = load_file(str(out / "model" / "model.safetensors"))
    assert want.keys() == have.keys()
    for k in want:
        torch.testing.assert_close(have[k], want[k], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CLASSES))
def test_the_fsdp_result_loads_with_from_pretrained_as_its_class(runs, kind):
    from transformers import AutoModelForSeq2SeqLM

    folder = runs["root"] / kind / "fsdp" / "model"
    model_type, _, groups, block, _ = CLASSES[kind]
    auto = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    model = auto.from_pretrained(folder, trust_remote_code=kind.startswith("gqa_")).eval()
    assert model.config.model_type == kind.split("-")[0]
    assert any(type(m).__name__ == block for m in model.modules())  # the class FSDP wrapped
    weights = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids) if model_type == "t5" else model(input_ids=ids)
    assert torch.isfinite(out.logits).all()
