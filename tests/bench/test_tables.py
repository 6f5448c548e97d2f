"""The docs' benchmark tables are what their JSON files render: no number is typed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "bench" / "tables.py"


def test_every_docs_table_is_its_json_rendered():
    out = subprocess.run([sys.executable, str(TABLES), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_changed_result_makes_the_check_fail(tmp_path, monkeypatch):
    """The check compares numbers: a results file edited by one digit no longer matches its table."""
    sys.path.insert(0, str(TABLES.parent))
    import tables

    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    assert tables.rewrite(text, page) == text
    for f in tables.RESULTS.glob("*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = json.loads((tables.RESULTS / "convert-e4d05b3-hub.json").read_text())
    data["median"]["convert"]["wall_s"] += 0.1
    (tmp_path / "convert-e4d05b3-hub.json").write_text(json.dumps(data))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    changed = tables.rewrite(text, page)
    assert changed != text and "0.847" in changed
