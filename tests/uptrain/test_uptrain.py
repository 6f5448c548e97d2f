"""Uptraining (convert.uptrain, launched as recipes/uptrain.py) on tiny llama models on CPU: real subprocess runs,
a real SIGKILL, a real 2-process launch.

Every run trains a 2-layer, 64-wide llama on a toy corpus, so a whole run costs a few seconds, most of it imports.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import convert.uptrain as uptrain_lib
from convert.uptrain.budget import plan_budget
from convert.uptrain.checkpointing import fingerprint
from tests.helpers.uptrain import (
    REPO,
    kill_after_checkpoint,
    losses,
    mean_pool_kv,
    ok,
    recipe_env,
    rows,
    run_recipe,
    start_scenarios,
    tiny_llama,
    toy_documents,
    train_tokenizer,
    two_process_launch,
    write_corpus,
)

# Shared by the runs below; block 32 x global batch 4 = 128 tokens a step.
BASE = [
    "block_size=32",
    "micro_batch_size=4",
    "grad_accum=1",
    "lr=3e-3",
    "warmup_steps=2",
    "seed=0",
    "max_eval_blocks=8",
    "report_to=none",
    "eval_every=6",
    "save_every=6",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("uptrain-assets")
    docs = toy_documents(300)
    tok = train_tokenizer(docs)
    corpus = write_corpus(root / "corpus.txt", docs)
    jsonl = root / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    teacher = tiny_llama(tok, root / "teacher-gqa2", num_kv_heads=2, seed=1, init_range=0.1)
    return {
        "root": root,
        "corpus": corpus,
        "jsonl": jsonl,
        "model": tiny_llama(tok, root / "model-mqa", num_kv_heads=1),
        "teacher": teacher,
        "student": mean_pool_kv(teacher, root / "student-mqa", tok),
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- runs that train
# Each scenario is a function run in a thread pool: the runs are mostly interpreter start-up and imports, so
# overlapping them roughly halves the wall time on 2 cores. The tests below wait for their scenario's result.

REFERENCE = ["max_steps=24", "micro_batch_size=2", "grad_accum=2"]  # global batch 4 on one process


def scenario_three_steps(assets, out):
    model = out.parent / "model"
    shutil.copytree(assets["model"], model)
    (model / "NOTICE.txt").write_text("carried over\n")
    return run_recipe(
        [
            *BASE,
            f"model={model}",
            f"data={assets['jsonl']}",
            "text_column=body",
            f"output_dir={out}",
            "max_steps=3",
            "pretraining_tokens=38400",
            "--json",
        ]
    )


def scenario_reference(assets, out):
    """An uninterrupted 24-step run on one process: what the killed and the 2-process runs must reproduce."""
    return ok(
        run_recipe(
            [*BASE, *REFERENCE, f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={out}", "--quiet"]
        )
    )


def scenario_kill_and_resume(assets, out):
    """The same run as the reference, slowed down, SIGKILLed after its step-6 checkpoint, then resumed."""
    args = [*BASE, *REFERENCE, f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={out}", "--quiet"]
    killed = kill_after_checkpoint(args, out)
    # as if a second kill had hit while the next checkpoint was being written
    (out / "checkpoints" / ".tmp-step-000012").mkdir()
    (out / "checkpoints" / ".tmp-step-000012" / "model.safetensors").write_bytes(b"partial")
    return killed, run_recipe([*args, "resume=auto"])


def scenario_two_processes(assets, out):
    # the installed-package route (the other runs use the recipes/uptrain.py launcher)
    launch = two_process_launch(
        REPO / "recipes/accelerate_ddp.yaml",
        "-m",
        "convert.uptrain",
        *BASE,
        "max_steps=24",
        "micro_batch_size=2",
        "grad_accum=1",
        f"model={assets['model']}",
        f"data={assets['corpus']}",
        f"output_dir={out}",
        "--quiet",
    )
    return subprocess.run(launch, capture_output=True, text=True, timeout=600, env=recipe_env(), cwd=REPO)


def scenario_lora(assets, out):
    return run_recipe(
        [
            *BASE,
            f"model={assets['model']}",
            f"data={assets['corpus']}",
            f"output_dir={out}",
            "max_steps=4",
            "train=lora",
            "lora_modules=[q_proj,o_proj,up_proj]",
            "lora_r=4",
            "lr=1e-2",
            "--quiet",
            "mixed_precision=bf16",
            "gradient_checkpointing=true",  # both through accelerate / transformers, on CPU
        ]
    )


def scenario_distillation(assets, out):
    return run_recipe(
        [
            *BASE,
            f"model={assets['student']}",
            f"teacher={assets['teacher']}",
            f"data={assets['corpus']}",
            f"output_dir={out}",
            "max_steps=12",
            "kd_weight=1.0",
            "kd_temperature=1.0",
            "lr=3e-3",
            "--quiet",
        ]
    )


def scenario_streaming_resume(assets, out):
    """A streamed 6-step run, then the same run resumed from its step-3 checkpoint."""
    args = [
        *BASE,
        f"model={assets['model']}",
        f"data={assets['corpus']}",
        f"output_dir={out}",
        "max_steps=6",
        "streaming=true",
        "save_every=3",
        "shuffle_buffer=50",
        "--quiet",
    ]
    first = ok(run_recipe(args))
    first_losses = losses(out)
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "step-000006")
    return first, first_losses, run_recipe([*args, "resume=auto"])


def scenario_nan(assets, out):
    return run_recipe(
        [
            *BASE,
            f"model={assets['model']}",
            f"data={assets['corpus']}",
            f"output_dir={out}",
            "max_steps=8",
            "save_every=2",
            "--quiet",
        ],
        hooks="on_loss=lambda step, loss: loss * float('nan') if step == 5 else loss",  # poison step 5
    )


SCENARIOS = {  # the longest chains first
    "kill": scenario_kill_and_resume,
    "stream": scenario_streaming_resume,
    "ddp": scenario_two_processes,
    "reference": scenario_reference,
    "three": scenario_three_steps,
    "lora": scenario_lora,
    "distill": scenario_distillation,
    "nan": scenario_nan,
}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Start every scenario at once (3 at a time); `runs[name]` waits for one: (output folder, its result)."""
    yield from start_scenarios(SCENARIOS, assets, tmp_path_factory.mktemp("runs"))


@pytest.mark.slow  # trains: the runs fixture starts every scenario's subprocesses
def test_three_step_run_writes_a_loadable_changed_model(assets, runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = runs["three"]
    ok(result)
    summary = json.loads(result.stdout)  # --json: stdout is the summary alone, the plan went to stderr
    assert "budget      3 steps x 4 blocks" in result.stderr and "compute     ~" in result.stderr
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 4 * 32
    assert summary["compute_fraction"] == pytest.approx(0.01)
    assert summary["final_eval"]["val_loss"] < summary["initial_eval"]["val_loss"]

    model_dir = out / "model"
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    before, after = weights(assets["model"]), weights(model_dir)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    assert torch.equal(loaded.model.embed_tokens.weight, after["model.embed_tokens.weight"])

    card = (model_dir / "README.md").read_text()
    assert "## Uptraining (gqa-convert)" in card and "384 (3 steps x 4 blocks x 32 tokens)" in card
    assert "0.01 of 38.4K pretraining tokens" in card and "| teacher | none |" in card
    assert json.loads((model_dir / "training_summary.json").read_text())["tokens"] == 384
    assert (model_dir / "NOTICE.txt").read_text() == "carried over\n"  # the input's other files travel along
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3]
    assert [r["step"] for r in rows(out, "eval")] == [0, 3]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".tmp*")) and not list((out / "checkpoints").glob(".tmp*"))


@pytest.mark.slow  # trains: the runs fixture starts every scenario's subprocesses
def test_sigkill_then_resume_reproduces_every_step(runs):
    reference, _ = runs["reference"]
    out, (killed, result) = runs["kill"]
    assert killed["returncode"] == -signal.SIGKILL, killed["log"]
    assert killed["checkpoint"] and not killed["model"]
    assert killed["logged"] >= 8  # steps after the checkpoint were logged, and must be replaced, not kept twice
    ok(result)
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith("step-000006"), result.stdout
    expected, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 25)) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= 1e-6, {s: (got[s], expected[s]) for s in expected if abs(got[s] - expected[s]) > 1e-6}
    ref_w, got_w = weights(reference / "model"), weights(out / "model")
    assert all(torch.allclose(ref_w[k], got_w[k], atol=1e-6, rtol=0) for k in ref_w)
    assert not (out / "checkpoints" / ".tmp-step-000012").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000018", "step-000024"]  # keep 2


@pytest.mark.slow  # trains: the runs fixture starts every scenario's subprocesses
def test_two_processes_match_one_process(runs):
    reference, _ = runs["reference"]
    out, result = runs["ddp"]
    ok(result)
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_batch"] == 4
    expected, got = losses(reference), losses(out)
    assert sorted(got) == sorted(expected)
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-4
    assert abs(got[1] - expected[1]) < 1e-5  # same weights, same blocks: only the summation order differs
    ref_eval, got_eval = rows(reference, "eval"), rows(out, "eval")
    assert [r["step"] for r in got_eval] == [r["step"] for r in ref_eval] == [0, 6, 12, 18, 24]
    assert got_eval[0]["val_loss"] == pytest.approx(ref_eval[0]["val_loss"], abs=1e-6)


@pytest.mark.slow  # trains: the runs fixture starts every scenario's subprocesses
def test_lora_merges_into_a_plain_checkpoint(assets, runs, monkeypatch):
    out, result = runs["lora"]
    ok(result)
    model_dir = out / "model"
    assert not (model_dir / "adapter_config.json").exists()
    before, after = weights(assets["model"]), weights(model_dir)
    assert before.keys() == after.keys()  # no lora_A / base_model keys: a plain llama checkpoint
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for layer in (0, 1):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        assert {f"{attn}.q_proj.weight", f"{attn}.o_proj.weight", f"{mlp}.up_proj.weight"} <= changed  # merged LoRA
        assert {f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"} <= changed  # trained fully (modules_to_save)
        assert f"{mlp}.down_proj.weight" not in changed and f"{mlp}.gate_proj.weight" not in changed
    assert "model.embed_tokens.weight" not in changed
    # loads, and runs, with peft made unimportable
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError):
        import peft  # noqa: F401
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, after["model.layers.0.self_attn.q_proj.weight"])
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, after["model.embed_tokens.weight"].shape[0])
    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["settings"]["mixed_precision"] == "bf16" and loaded.dtype == torch.float32  # saved as the input


@pytest.mark.slow  # trains: the runs fixture starts every scenario's subprocesses
def test_distillation_lowers_kl_to_the_teacher(assets, runs):
    out, result = runs["distill"]
    ok(result)
    evals = rows(out, "eval")
    assert evals[0]["val_kl"] > 0.05  # mean-pooling the teacher's two K/V heads moved its predictions
    assert evals[-1]["val_kl"] < 0.7 * evals[0]["val_kl"], evals  # about 0.55x in 12 steps here
    train = rows(out, "train")
    assert all("kl" in r for r in train) and train[-1]["kl"] < train[0]["kl"]
    card = (out / "model" / "README.md").read_text()
    assert f"| teacher | {assets['teacher']} (KL weight 1.0, temperature 1.0) |" in card


@pytest.mark.slow  # trains: the runs fixture starts every scenario's subprocesses
def test_streaming_resume_continues_the_stream(runs):
    out, (_, first, result) = runs["stream"]
    ok(result)
    again = losses(out)
    assert sorted(again) == list(range(1, 7))
    assert max(abs(again[s] - first[s]) for s in first) <= 1e-6
    assert json.loads((out / "model" / "training_summary.json").read_text())["resumed_from"].endswith("step-000003")
    assert (out / "checkpoints" / "step-000003" / "stream_state.json").is_file()


@pytest.mark.slow  # trains: the runs fixture starts every scenario's subprocesses
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(runs):
    out, result = runs["nan"]
    assert result.returncode == 1, result.stderr
    assert "the loss is nan at step 5" in result.stderr and "step-000004 (step 4)" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not (out / "model").exists()
    assert max(losses(out)) == 4  # the poisoned step is not recorded as a result


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def recipe():
    return uptrain_lib


def fails(recipe, capsys, args: list[str]) -> str:
    """Run the library's command line in-process on bad input: exit code 2, nothing written, the message returned."""
    started = time.time()
    code = recipe.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err
    assert time.time() - started < 60
    return err[err.index("error: ") :]


def test_bad_model_folders(recipe, assets, tmp_path, capsys):
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(assets["model"], no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    no_cfg = tmp_path / "no-config"
    shutil.copytree(assets["model"], no_cfg)
    (no_cfg / "config.json").unlink()
    common = [f"data={assets['corpus']}", "max_steps=1", f"output_dir={tmp_path / 'out'}"]
    assert "has no tokenizer" in fails(recipe, capsys, [f"model={no_tok}", *common])
    assert "has no config.json" in fails(recipe, capsys, [f"model={no_cfg}", *common])
    assert "does not exist" in fails(recipe, capsys, [f"model={tmp_path / 'nowhere'}", *common])
    assert "teacher folder" in fails(recipe, capsys, [f"model={assets['model']}", f"teacher={no_cfg}", *common])
    assert not (tmp_path / "out").exists()


def test_bad_data(recipe, assets, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "small.txt").write_text("the cat sat on the mat .\n")
    common = [f"model={assets['model']}", "max_steps=1", f"output_dir={tmp_path / 'out'}", "block_size=64"]
    assert "holds no text" in fails(recipe, capsys, [*common, f"data={tmp_path / 'empty.txt'}"])
    err = fails(recipe, capsys, [*common, f"data={tmp_path / 'small.txt'}", "validation_fraction=0"])
    assert "fewer than one block (64)" in err and "tokens" in err
    err = fails(recipe, capsys, [*common, f"data={assets['jsonl']}"])
    assert "text column 'text' not found" in err and "id, body" in err
    err = fails(recipe, capsys, [*common, f"data={tmp_path / 'missing.jsonl'}"])
    assert "missing.jsonl' does not exist" in err
    err = fails(recipe, capsys, [*common, f"data={assets['corpus']}", "validation_fraction=0.001"])
    assert "validation data" in err and "fewer tokens than one block" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "budget, message",
    [
        (["compute_fraction=0", "pretraining_tokens=1000"], "compute_fraction must be positive"),
        (["compute_fraction=-0.05", "pretraining_tokens=1000"], "compute_fraction must be positive"),
        (["compute_fraction=5", "pretraining_tokens=1000"], "for 5% write 0.05"),
        (["compute_fraction=0.05"], "compute_fraction needs pretraining_tokens"),
        (["compute_fraction=0.05", "pretraining_tokens=0"], "pretraining_tokens must be positive"),
        (["tokens=0"], "tokens must be positive"),
        (["max_steps=-3"], "max_steps must be positive"),
        (["max_steps=3", "tokens=1000"], "give exactly one budget"),
        ([], "give exactly one budget"),
        (["max_steps=2.5"], "max_steps must be a whole number"),
    ],
)
def test_bad_budgets(recipe, assets, tmp_path, capsys, budget, message):
    common = [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={tmp_path}"]
    err = fails(recipe, capsys, [*common, *budget])
    assert message in err


def test_bad_settings_are_named(recipe, assets, tmp_path, capsys):
    common = [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={tmp_path / 'o'}", "max_steps=1"]
    assert "unknown setting 'lrr' (did you mean 'lr'?)" in fails(recipe, capsys, [*common, "lrr=1e-3"])
    assert "train must be one of" in fails(recipe, capsys, [*common, "train=everything"])
    err = fails(recipe, capsys, [*common, "lr=0", "block_size=1"])  # every problem at once
    assert "lr must be positive" in err and "block_size must be at least 2" in err
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    assert "not valid YAML" in fails(recipe, capsys, [str(tmp_path / "bad.yaml")])


def test_lora_modules_that_do_not_exist(recipe, assets, tmp_path, capsys):
    common = [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={tmp_path}", "max_steps=1"]
    err = fails(recipe, capsys, [*common, "train=lora", "lora_modules=[q_proj,qkv_proj]"])
    assert "lora_modules names modules that do not exist" in err and "qkv_proj" in err and "k_proj" in err
    err = fails(recipe, capsys, [*common, "train=kv", "kv_modules=[key,value]"])
    assert "kv_modules names modules that do not exist" in err and "key, value" in err
    err = fails(recipe, capsys, [*common, "train=lora", "lora_modules=[q_proj,k_proj]"])
    assert "k_proj cannot be both a LoRA target and fully trained" in err


def test_output_folder_with_another_runs_checkpoints(recipe, assets, tmp_path, capsys):
    out = tmp_path / "out"
    common = [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={out}", "max_steps=20"]
    settings, _ = recipe.load_settings(common)
    other_run = fingerprint(settings, plan_budget(settings, 1)) | {"lr": 0.5, "seed": 7}
    ckpt = out / "checkpoints" / "step-000010"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 10, "run": other_run}))
    err = fails(recipe, capsys, common)
    assert "holds another run's checkpoints (step-000010" in err and "resume: auto" in err
    err = fails(recipe, capsys, [*common, "resume=auto"])
    assert "holds a checkpoint of another run" in err and "lr: 0.5 -> 0.0001" in err and "seed: 7 -> 0" in err
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "step-000010", "trainer_state.json"]
