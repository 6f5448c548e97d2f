"""Uptraining from an installed wheel: built, installed into a fresh venv, run from outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.uptrain import tiny_llama, toy_documents, train_tokenizer, write_corpus

REPO = Path(__file__).resolve().parents[2]


def run(command: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_uptrain_from_an_installed_wheel(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("ACCELERATE_", "RANK"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_NO_INDEX="1")
    source = tmp_path / "source"  # a copy, so that the build writes nothing into the checkout
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs")
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source]
    run(build, tmp_path, env)
    (wheel,) = wheels.glob("gqa_convert-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, script = venv / "bin" / "python", venv / "bin" / "gqa-convert"
    # The dependencies come from the environment running the tests (a venv or a system install alike), after the
    # new venv's own site-packages, so that the wheel's copy of gqa-convert is the one imported.
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env)
    (Path(purelib.stdout.strip()) / "tested-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--quiet", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"  # no checkout here: only the installed package can answer
    work.mkdir()
    where = run([python, "-c", "import convert.uptrain as u; print(u.__file__)"], work, env).stdout.strip()
    assert where.startswith(str(venv)), where

    docs = toy_documents(200)
    tokenizer = train_tokenizer(docs)
    model = tiny_llama(tokenizer, work / "model-mqa")
    write_corpus(work / "corpus.txt", docs)
    settings = [
        "model=model-mqa",
        "data=corpus.txt",
        "output_dir=run",
        "max_steps=2",
        "block_size=32",
        "micro_batch_size=2",
        "max_eval_blocks=2",
        "save_every=1",
        "keep_checkpoints=1",
        "resume=never",
        "report_to=none",
        "--json",
    ]
    # the shipped SmolLM2 config, found by name in the package, with this tiny model and corpus put in
    result = run([script, "uptrain", "smollm2-mqa-cpu", *settings], work, env)
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["settings"]["lr"] == 3e-4  # the shipped config's lr
    assert summary["settings"]["model"] == "model-mqa" and model.is_dir()
    assert (work / "run" / "model" / "model.safetensors").is_file()
    assert [p.name for p in (work / "run" / "checkpoints").iterdir()] == ["step-000002"]
    usage = run([python, "-m", "convert.uptrain", "--help"], work, env).stdout
    assert "smollm2-mqa-cpu" in usage and "trust_remote_code (False)" in usage
