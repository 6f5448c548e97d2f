"""Habits of the package: one version, extras that really are optional."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import read_configuration

import convert
from convert.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[2]


def test_version_lives_in_one_place():
    """pyproject reads the version from convert/__init__.py, and the CLI prints that same string."""
    project = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]
    assert "version" in project["dynamic"]
    assert project["version"] == convert.__version__
    out = subprocess.run([sys.executable, "-m", "convert.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"gqa-convert, version {convert.__version__}"


def _without_uptrain_extra(*args) -> subprocess.CompletedProcess:
    """`gqa-convert ARGS` in a process where the uptrain extra's modules cannot be imported."""
    code = (
        "import sys\n"
        "for name in ('accelerate', 'peft'):\n"
        "    sys.modules[name] = None  # import raises ImportError, as when not installed\n"
        "from convert.cli import main\n"
        f"sys.argv = ['gqa-convert', *{[str(a) for a in args]!r}]\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.slow
def test_core_commands_work_without_the_uptrain_extra(tmp_path):
    """convert, inspect and eval need neither accelerate nor peft; uptrain names the extra to install."""
    from tests.helpers.eval import make

    src = make(tmp_path, "src")
    out = tmp_path / "mqa"
    converted = _without_uptrain_extra("convert", src, out, "-g", "1", "--method", "first", "--json")
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["kv_heads_after"] == 1
    inspected = _without_uptrain_extra("inspect", out, "--json")
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["num_kv_heads"] == 1
    evaluated = _without_uptrain_extra(
        "eval", out, "--contexts", "8", "--new-tokens", "1", "--window", "16", "--max-windows", "1", "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)[0]["perplexity"] > 1
    uptrain = _without_uptrain_extra("uptrain", "smollm2-mqa-cpu")
    assert uptrain.returncode == 2
    assert uptrain.stderr.strip() == (
        "error: uptraining needs accelerate, peft, not installed with the core package: "
        'pip install "gqa-convert[uptrain]"'
    )


def test_extras_in_pyproject_match_the_install_message():
    """The README's `.[demo]` and `.[test]` install every extra; the uptrain extra lists what extras.py checks."""
    extras = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("[")[0] for req in extras["uptrain"]}
    assert names == {dist for _, dist in EXTRAS["uptrain"]}
    assert "gqa-convert[uptrain]" in extras["demo"] and "gqa-convert[demo]" in extras["test"]
    assert {"ruff", "pre-commit"} <= {req.split(">")[0] for req in extras["dev"]}
    core = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]["dependencies"]
    assert not names & {req.split(">")[0] for req in core}


@pytest.mark.parametrize("entry", [["-m", "convert.uptrain"], [str(ROOT / "recipes" / "uptrain.py")]])
def test_uptrain_module_and_recipe_without_the_extra_name_it(tmp_path, entry):
    """`python -m convert.uptrain` and the recipe, where accelerate and peft cannot be imported: one line naming
    the extra to install, exit 2, no traceback (a sitecustomize hides the modules before runpy starts)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['accelerate'] = sys.modules['peft'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, *entry, "smollm2-mqa-cpu"], capture_output=True, text=True, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        "error: uptraining needs accelerate, peft, not installed with the core package: "
        'pip install "gqa-convert[uptrain]"'
    )
