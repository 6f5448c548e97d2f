"""Uptraining a converted T5 with span corruption (objective=span_corruption): real subprocess runs on a tiny
T5.1.1 converted to MQA with shipped code, a real SIGKILL and exact resume, a real 2-process launch, distillation
from the original T5, and the inputs that cannot work refused by name."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from convert.text.span_corruption import SpanCorruption
from convert.uptrain import make_settings
from convert.uptrain.budget import plan_budget
from tests.helpers.uptrain import (
    REPO,
    kill_after_checkpoint,
    losses,
    ok,
    recipe_env,
    rows,
    run_recipe,
    start_scenarios,
    t5_tokenizer,
    tiny_llama,
    tiny_t5,
    toy_documents,
    train_tokenizer,
    two_process_launch,
    write_corpus,
)

# block_size 32 is the encoder input: runs of 34 tokens give 32 inputs + 8 targets, 40 tokens a row.
BASE = [
    "objective=span_corruption",
    "trust_remote_code=true",
    "block_size=32",
    "lr=3e-3",
    "warmup_steps=2",
    "seed=0",
    "max_eval_blocks=8",
    "report_to=none",
    "eval_every=6",
    "save_every=6",
    "max_steps=18",
    "kd_weight=1.0",  # the KL alone: it must fall (the plain run shows the span loss falling)
]
REFERENCE = ["micro_batch_size=2", "grad_accum=2"]  # global batch 4 on one process


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from convert.pipeline.conversion import convert_checkpoint

    root = tmp_path_factory.mktemp("uptrain-t5-assets")
    docs = toy_documents(300)
    tok = t5_tokenizer(docs)
    teacher = tiny_t5(tok, root / "t5", init_factor=0.5)
    convert_checkpoint(teacher, root / "mqa", 1, "mean", progress=False, write_modeling_code=True)
    tok.save_pretrained(root / "mqa")
    llama_tok = train_tokenizer(docs)
    return {
        "root": root,
        "corpus": write_corpus(root / "corpus.txt", docs),
        "teacher": teacher,
        "student": root / "mqa",
        "llama": tiny_llama(llama_tok, root / "llama"),
        "tokenizer": tok,
    }


def args(assets, out: Path, *extra: str) -> list[str]:
    return [
        *BASE,
        f"model={assets['student']}",
        f"teacher={assets['teacher']}",
        f"data={assets['corpus']}",
        f"output_dir={out}",
        "--quiet",
        *extra,
    ]


def scenario_reference(assets, out):
    return ok(run_recipe(args(assets, out, *REFERENCE, "pretraining_tokens=72000")))


def scenario_kill_and_resume(assets, out):
    """The reference run slowed down, SIGKILLed after its step-6 checkpoint, then resumed."""
    command = args(assets, out, *REFERENCE, "pretraining_tokens=72000")
    killed = kill_after_checkpoint(command, out)
    return killed, run_recipe([*command, "resume=auto"])


def scenario_two_processes(assets, out):
    launch = two_process_launch(
        REPO / "recipes/accelerate_ddp.yaml",
        "-m",
        "convert.uptrain",
        *args(assets, out, "micro_batch_size=2", "grad_accum=1", "pretraining_tokens=72000"),
    )
    return subprocess.run(launch, capture_output=True, text=True, timeout=600, env=recipe_env(), cwd=REPO)


def scenario_plain(assets, out):
    """No teacher: the span-corruption loss alone."""
    command = [a for a in args(assets, out, *REFERENCE) if not a.startswith(("teacher=", "kd_weight="))]
    return ok(run_recipe(command))


SCENARIOS = {
    "kill": scenario_kill_and_resume,
    "ddp": scenario_two_processes,
    "reference": scenario_reference,
    "plain": scenario_plain,
}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    yield from start_scenarios(SCENARIOS, assets, tmp_path_factory.mktemp("t5-runs"))


@pytest.mark.slow  # trains
def test_span_corruption_run_writes_a_loadable_mqa_t5_and_learns(assets, runs):
    from transformers import AutoModelForSeq2SeqLM

    out, _ = runs["reference"]
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    span = SpanCorruption(input_length=32)
    assert summary["tokens"] == 18 * 4 * (span.input_length + span.target_length) == 2880  # inputs + targets
    assert summary["compute_fraction"] == pytest.approx(2880 / 72000)
    assert summary["final_eval"]["val_kl"] < summary["initial_eval"]["val_kl"] / 2
    plain = json.loads((runs["plain"][0] / "model" / "training_summary.json").read_text())
    assert plain["final_eval"]["val_loss"] < plain["initial_eval"]["val_loss"] - 0.5
    assert "val_kl" not in plain["final_eval"]
    assert (out / "loss.png").is_file()
    card = (out / "model" / "README.md").read_text()
    assert "(32 inputs + 8 targets) tokens" in card
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model", trust_remote_code=True)
    assert type(model).__name__ == "GQAT5ForConditionalGeneration" and model.config.num_key_value_heads == 1
    before = AutoModelForSeq2SeqLM.from_pretrained(assets["student"], trust_remote_code=True)
    k = "decoder.block.0.layer.1.EncDecAttention.k.weight"
    assert model.state_dict()[k].shape == before.state_dict()[k].shape == (8, 32)
    assert not torch.equal(model.state_dict()[k], before.state_dict()[k])
    ids = torch.tensor([assets["tokenizer"]("the cat sat on")["input_ids"]])
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 1


@pytest.mark.slow  # trains
def test_sigkill_then_resume_reproduces_every_step(runs):
    ref, _ = runs["reference"]
    out, (killed, resumed) = runs["kill"]
    assert killed["returncode"] == -signal.SIGKILL and killed["checkpoint"] and not killed["model"]
    assert 6 < killed["logged"] < 18
    ok(resumed)
    assert losses(out) == losses(ref)  # exact: same batches, same masks, same RNG, same optimizer state
    assert [r["val_loss"] for r in rows(out, "eval")] == [r["val_loss"] for r in rows(ref, "eval")]


@pytest.mark.slow  # trains
def test_two_processes_match_one_process(runs):
    ref, _ = runs["reference"]
    out, result = runs["ddp"]
    ok(result)
    mine, theirs = losses(out), losses(ref)
    assert mine.keys() == theirs.keys()
    for step in mine:
        assert mine[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-5), step


# ------------------------------------------------------------------------------------------ refused inputs (fast)


def refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_causal_model_with_span_corruption_is_refused(assets, tmp_path):
    out = tmp_path / "run"
    result = run_recipe([*BASE, f"model={assets['llama']}", f"data={assets['corpus']}", f"output_dir={out}"])
    refused(result, "objective=span_corruption needs an encoder-decoder", "decoder-only llama", "objective=causal_lm")
    assert not out.exists()


def test_t5_with_causal_lm_is_refused(assets, tmp_path):
    out = tmp_path / "run"
    result = run_recipe([f"model={assets['teacher']}", f"data={assets['corpus']}", f"output_dir={out}", "max_steps=1"])
    refused(result, "objective=causal_lm trains decoder-only", "encoder-decoder t5", "objective=span_corruption")
    assert not out.exists()


def test_tokenizer_without_sentinels_is_refused(assets, tmp_path):
    model = tmp_path / "t5-plain-tokenizer"
    shutil.copytree(assets["teacher"], model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(toy_documents(50)).save_pretrained(model)  # no <extra_id_N>
    out = tmp_path / "run"
    result = run_recipe([*BASE, f"model={model}", f"data={assets['corpus']}", f"output_dir={out}"])
    refused(result, "has 0 sentinel tokens", "needs 2", "use a T5 or mT5 tokenizer")
    assert not (out / "model").exists()


def test_span_settings_are_checked_and_budgeted():
    base = {"model": "m", "data": "d", "output_dir": "o", "objective": "span_corruption", "max_steps": 3}
    s = make_settings({**base, "block_size": 512, "micro_batch_size": 2, "grad_accum": 3})
    assert plan_budget(s, 2)["tokens_per_step"] == 12 * (512 + 114)  # T5's lengths: 512 inputs, 114 targets
    causal = make_settings({**base, "objective": "causal_lm", "block_size": 512})
    assert plan_budget(causal, 1)["tokens_per_step"] == 4 * 512
    with pytest.raises(ValueError, match="objective=span_corruption reads the corpus into memory"):
        make_settings({**base, "streaming": True})
    with pytest.raises(ValueError, match="no run of tokens fills block_size=4"):
        make_settings({**base, "block_size": 4, "noise_density": 0.9, "mean_span_length": 1})
    with pytest.raises(ValueError, match="objective must be one of causal_lm, span_corruption"):
        make_settings({**base, "objective": "prefix_lm"})


@pytest.mark.slow  # trains two steps
def test_checkpoint_of_other_span_settings_is_not_resumed(assets, tmp_path):
    out = tmp_path / "run"
    first = [a for a in args(assets, out, "micro_batch_size=2") if not a.startswith(("teacher=", "max_steps="))]
    ok(run_recipe([*first, "max_steps=2", "save_every=1", "eval_every=0"]))
    shutil.rmtree(out / "model")  # as if the run had stopped after its checkpoints
    result = run_recipe([*first, "max_steps=2", "save_every=1", "eval_every=0", "noise_density=0.3", "resume=auto"])
    refused(result, "holds a checkpoint of another run", "noise_density: 0.15 -> 0.3")
