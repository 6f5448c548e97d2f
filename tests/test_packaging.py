"""Habits of the package: one version, extras that really are optional."""

import subprocess
import sys
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration

import convert

ROOT = Path(__file__).resolve().parents[1]


def test_version_lives_in_one_place():
    """pyproject reads the version from convert/__init__.py, and the CLI prints that same string."""
    project = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]
    assert "version" in project["dynamic"]
    assert project["version"] == convert.__version__
    out = subprocess.run([sys.executable, "-m", "convert.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"gqa-convert, version {convert.__version__}"
