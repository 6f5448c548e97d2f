"""The uptraining settings model, its schedule and its input checks: no training, milliseconds each."""

from __future__ import annotations

import json

import pytest
import torch

from convert.errors import SettingsError
from convert.uptrain import Settings, load_settings, main, make_settings
from convert.uptrain.budget import lr_factor, plan_budget
from convert.uptrain.model import check_model_folder
from convert.uptrain.settings import CONFIG_DIR, RUN_KEYS
from tests.helpers.uptrain import tiny_llama, toy_documents, train_tokenizer

REQUIRED = ["model=m", "data=d.txt", "output_dir=o"]


def problems(args: list[str]) -> str:
    with pytest.raises(SettingsError) as e:
        load_settings(args)
    return str(e.value)


def test_command_line_strings_take_the_declared_types():
    s, options = load_settings(
        [
            *REQUIRED,
            "max_steps=1e3",  # a whole count written as a float
            "--lr",
            "3e-3",
            "kv_modules=k_proj,v_proj",
            "lora_modules=[q_proj, o_proj]",
            "mixed_precision=no",
            "validation=null",
            "streaming=yes",
            "data_config=2",  # a number where a name is expected stays a name
            "--quiet",
        ]
    )
    assert s.max_steps == 1000 and isinstance(s.max_steps, int)
    assert s.lr == 0.003 and s.kv_modules == ["k_proj", "v_proj"] and s.lora_modules == ["q_proj", "o_proj"]
    assert s.mixed_precision == "no" and s.validation is None and s.streaming is True and s.data_config == "2"
    assert options.quiet and not options.json


def test_yaml_then_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata: [a.txt, b.txt]\noutput_dir: o\nmax_steps: 5\nlr: 1.0e-3\nmixed_precision: no\n")
    s, _ = load_settings([str(config), "lr=2e-3"])
    assert s.data == ["a.txt", "b.txt"] and s.max_steps == 5 and s.lr == 0.002 and s.mixed_precision == "no"


def test_a_mixture_from_yaml_and_the_data_settings(tmp_path):
    config = tmp_path / "mix.yaml"
    config.write_text(
        "model: m\noutput_dir: o\nmax_steps: 5\ndata:\n  - {source: web/*.jsonl, weight: 0.7}\n"
        "  - {source: bigcode/the-stack-smol, config: python, text_column: content, weight: 0.3}\n"
    )
    s, _ = load_settings([str(config), "num_workers=2", "data_cache=/tmp/c"])
    assert s.data == [
        {"source": "web/*.jsonl", "weight": 0.7},
        {"source": "bigcode/the-stack-smol", "config": "python", "text_column": "content", "weight": 0.3},
    ]
    assert s.num_workers == 2 and s.data_cache == "/tmp/c" and "num_workers" not in RUN_KEYS
    assert (
        load_settings([*REQUIRED, "max_steps=1"])[0].num_workers == 1
    )  # the default: one worker off the training thread
    assert "num_workers must be not negative, got -1" in problems([*REQUIRED, "max_steps=1", "num_workers=-1"])
    mix = "data=[{source: a.txt, weight: 1}, {source: b.txt, weight: 1}]"
    assert "takes one source, not a mixture" in problems(
        [*REQUIRED[:1], *REQUIRED[2:], mix, "max_steps=1", "objective=span_corruption"]
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_is_valid_and_found_by_name(name):
    s, _ = load_settings([name])
    assert s == load_settings([str(CONFIG_DIR / f"{name}.yaml")])[0]
    assert s.model and s.output_dir


def test_recipes_configs_is_the_shipped_folder():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[2] / "recipes" / "configs"
    assert sorted(p.name for p in recipes.glob("*.yaml")) == sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["max_steps=1", "lrr=1"], "unknown setting 'lrr' (did you mean 'lr'?)"),
        (["max_steps=1", "zzz=1"], "unknown setting 'zzz'"),
        (["max_steps=2.5"], "max_steps must be a whole number, got 2.5"),
        (["max_steps=1", "lr=fast"], "lr must be a number, got 'fast'"),
        (["max_steps=1", "streaming=maybe"], "streaming must be true or false, got 'maybe'"),
        (["max_steps=1", "train=all"], "train must be one of full, attention, kv, lora, got 'all'"),
        (["max_steps=1", "txt_documents=x"], "txt_documents must be one of auto, wikitext, paragraphs, lines, file"),
        (["max_steps=1", "mixed_precision=fp8"], "mixed_precision must be one of no, bf16, fp16, got 'fp8'"),
        (["max_steps=1", "min_lr_ratio=2"], "min_lr_ratio must be in [0, 1], got 2"),
        (["max_steps=1", "adam_beta2=1"], "adam_beta2 must be in [0, 1), got 1"),
        (["max_steps=1", "validation_fraction=1"], "validation_fraction must be in [0, 1), got 1"),
        (["max_steps=1", "eval_every=-1"], "eval_every must be not negative, got -1"),
        (["max_steps=1", "block_size=1"], "block_size must be at least 2, got 1"),
        (["max_steps=1", "grad_accum=0"], "grad_accum must be positive, got 0"),
        (["max_steps=1", "max_seconds=0"], "max_seconds must be positive, got 0"),
        (["max_steps=1", "min_steps=0"], "min_steps must be positive, got 0"),
        (["max_steps=1", "train=kv", "kv_modules="], "train=kv needs kv_modules"),
        (["max_steps=1", "resume=/no/such/folder"], "resume must be never, auto or a checkpoint folder"),
        (["tokens=100", "max_steps=1"], "give exactly one budget: max_steps, tokens, or compute_fraction"),
    ],
)
def test_one_clear_line_per_problem(args, message):
    assert message in problems([*REQUIRED, *args])


def test_missing_required_settings_and_every_field_problem_at_once():
    err = problems(["max_steps=1", "lr=0", "block_size=1"])
    assert err.startswith("bad settings:")
    for line in ("model is not set", "output_dir is not set", "data is not set", "lr must be positive"):
        assert f"  - {line}" in err
    assert problems(["model=", "data=d", "output_dir=o", "max_steps=1"]) == "model is not set"


def test_lora_is_accepted_under_fsdp(monkeypatch):
    """peft's adapters shard with FSDP2 (tests/uptrain/test_fsdp_classes.py trains them on 2 processes)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert load_settings([*REQUIRED, "max_steps=1", "train=lora"])[0].train == "lora"


def test_python_api_checks_the_same_rules():
    s = make_settings({"model": "m", "data": "d", "output_dir": "o", "tokens": 1000})
    assert s.tokens == 1000 and s.max_steps is None
    with pytest.raises(SettingsError, match="give exactly one budget"):
        make_settings({"model": "m", "data": "d", "output_dir": "o"})
    assert Settings(model="m", data="d", output_dir="o", max_steps=3).warmup_ratio == 0.05


def test_run_keys_are_settings():
    assert set(RUN_KEYS) <= set(Settings.model_fields)
    assert not {"output_dir", "resume", "eval_every", "save_every", "trust_remote_code"} & set(RUN_KEYS)


def test_budget_in_steps_and_warmup():
    s = make_settings(
        {"model": "m", "data": "d", "output_dir": "o", "compute_fraction": 0.05, "pretraining_tokens": 10_000}
    )
    plan = plan_budget(s.model_copy(update={"block_size": 10, "micro_batch_size": 2}), num_processes=3)
    assert plan["global_batch"] == 6 and plan["tokens_per_step"] == 60
    assert plan["total_steps"] == 9 and plan["tokens"] == 540  # ceil(500 / 60)
    assert plan["warmup_steps"] == 0  # round(0.05 x 9)


def test_schedule_against_transformers_cosine_with_min_lr():
    """Ours ramps (step + 1) / warmup, transformers' step / warmup: one step apart in warmup, equal after it."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    total, warmup, ratio = 40, 5, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs_schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=ratio)
    theirs = []
    for _ in range(total):
        theirs.append(theirs_schedule.get_last_lr()[0])
        optimizer.step()
        theirs_schedule.step()
    ours = [lr_factor(step, warmup, total, ratio) for step in range(total)]
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(1 / warmup)  # transformers' first step learns nothing
    assert ours[: warmup - 1] == pytest.approx(theirs[1:warmup])
    assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)
    assert ours[-1] > ratio and lr_factor(total, warmup, total, ratio) == pytest.approx(ratio)


# ----------------------------------------------------------------------------------------------- remote code


@pytest.fixture(scope="module")
def remote_code_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    docs = toy_documents(40)
    folder = tiny_llama(train_tokenizer(docs), root / "model")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (root / "train.txt").write_text("\n\n".join(docs))
    return folder


def test_remote_code_is_refused_unless_trusted(remote_code_model, tmp_path, capsys):
    with pytest.raises(SettingsError, match=r"modeling_custom\.py.*set trust_remote_code=true"):
        check_model_folder(str(remote_code_model), "model", trust_remote_code=False)
    check_model_folder(str(remote_code_model), "model", trust_remote_code=True)
    args = [
        f"model={remote_code_model}",
        f"data={remote_code_model.parent / 'train.txt'}",
        f"output_dir={tmp_path / 'out'}",
        "max_steps=1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model folder" in err and "trust_remote_code=true" in err
    assert not (tmp_path / "out").exists()


def test_gqa_convert_uptrain_is_the_same_command_line(tmp_path):
    from click.testing import CliRunner

    from convert.cli import main as cli

    result = CliRunner().invoke(cli, ["uptrain", *REQUIRED, "max_steps=1", "lrr=1"])
    assert result.exit_code == 2
    assert "error: unknown setting 'lrr' (did you mean 'lr'?)" in result.output
    result = CliRunner().invoke(cli, ["uptrain", "--help"])
    assert result.exit_code == 0 and "trust_remote_code (False)" in result.output
