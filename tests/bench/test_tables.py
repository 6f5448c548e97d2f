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


def test_a_named_entry_renders_its_own_table(tmp_path, monkeypatch):
    """`<!-- table: FILE.json#KEY -->` renders the entry KEY of the file, beside the file's main table."""
    sys.path.insert(0, str(TABLES.parent))
    import tables

    data = {
        "table": {"columns": ["a"], "rows": [[1]]},
        "curves": {"columns": ["x", "y"], "rows": [["p", 2.5]]},
        "provenance": {"commit": "abc1234", "command": "python bench/x.py", "date": "2026-12-04T00:00:00+00:00"},
    }
    (tmp_path / "x.json").write_text(json.dumps(data))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    page = tmp_path / "page.md"
    text = "<!-- table: x.json -->\n<!-- /table -->\n<!-- table: x.json#curves -->\nold\n<!-- /table -->\n"
    out = tables.rewrite(text, page)
    assert "| a |\n|---|\n| 1 |" in out
    assert "<!-- table: x.json#curves -->\n| x | y |\n|---|---|\n| p | 2.5 |\n" in out and "old" not in out
    assert "Commit abc1234, 2026-12-04, `python bench/x.py`. Results: [bench/results/x.json](x.json)." in out
