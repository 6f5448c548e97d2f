"""The docs' benchmark tables, generated from `bench/results/*.json`: every number carries the commit and the
command that produced it, read from the JSON, never typed into prose.

    python bench/tables.py           rewrite every `<!-- table: FILE.json -->` ... `<!-- /table -->` block in docs/
    python bench/tables.py --check   exit 1 if a block is not what its JSON renders (the tests run this)

`<!-- table: FILE.json#KEY -->` renders the entry KEY of the file (a {"columns": [...], "rows": [...]} table) instead
of its main `table`, so one results file can give a page several tables.

A results file states its provenance as {"provenance": {"commit": ..., "command": ..., "date": ...}} (the benches
write it); older files carry the commit under "git" and the date under "meta".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(
    r"(<!-- table: (?P<file>[\w.\-]+\.json)(?:#(?P<key>\w+))? -->\n)(?P<body>.*?)(<!-- /table -->)", re.S
)


def provenance(argv: list[str] | None = None) -> dict:
    """What a bench writes into its JSON: this checkout's commit (with a mark when it has local changes), the
    command line and the time."""
    import datetime

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # Results files written by earlier runs are not code: they do not make a measurement "dirty".
    dirty = bool(git("status", "--porcelain", "--", "convert", "bench", ":!bench/results"))
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *(argv or sys.argv[1:])])
    return {
        "commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _source(d: dict) -> str:
    p = d.get("provenance") or {}
    commit = p.get("commit") or d.get("git", {}).get("commit", "?")
    date = (p.get("date") or d.get("date") or d.get("meta", {}).get("date", "?"))[:10]
    command = p.get("command", "?")
    return f"Commit {commit}, {date}, `{command}`."


NAIVE_RATIO = ("convert", "convertsync", "naive")


def _convert(d: dict) -> list[str]:
    names = {
        "copy": "copy (`cp -rL`)",
        "convert": "`gqa-convert convert`",
        "copysync": "copy, then `sync` of its files",
        "convertsync": "`gqa-convert convert --fsync`",
        "naive": "naive transformers",
    }
    m = d["median"]
    rows = ["| method | wall s | CPU s | peak RSS MiB | time / copy | naive RSS / this |", "|---|---|---|---|---|---|"]
    for key, label in names.items():
        r = m[key]
        rows.append(
            f"| {label} | {r['wall_s']:.3f} | {r['cpu_s']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['wall_s'] / m['copy']['wall_s']:.2f}× | "
            + (f"{m['naive']['peak_rss_mib'] / r['peak_rss_mib']:.1f}× |" if key in NAIVE_RATIO else "- |")
        )
    goals = [
        f"- {g}: {v['what']}: **{v['value']:.2f}{v['unit']}**, goal {'met' if v['goal_met'] else 'not met'}"
        for g, v in d["goals"].items()
    ]
    return [*rows, "", *goals]


def _calibrated(d: dict) -> list[str]:
    rows = ["| method | perplexity | calibration tokens | conversion s | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in d["results"]:
        s = "-" if r.get("convert_s") is None else f"{r['convert_s']:.2f}"
        rss = "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        rows.append(f"| {r['method']} | {r['ppl']:,.2f} | {r['calibration_tokens']:,} | {s} | {rss} |")
    meta = d["meta"]
    out = [
        f"{meta['model']}, {meta['num_kv_heads']} KV head(s); {meta['eval']}; calibration: {meta['calibration']}.",
        "",
        *rows,
    ]
    if "ratio" in d:
        r = d["ratio"]
        line = (
            f"Cost: one float32 forward pass over the same {r['tokens']:,} tokens took {r['forward_float32_s']:.2f} s;"
        )
        if "ratio" in r:
            line += f" the calibrated conversion {r['calibrated_convert_s']:.2f} s: **{r['ratio']:.2f}×**;"
        if "ratio_reconstructed" in r:
            line += (
                f" `--method reconstructed` {r['reconstructed_convert_s']:.2f} s: "
                f"**{r['ratio_reconstructed']:.2f}×** (budget 6×);"
            )
        out += ["", line[:-1] + "."]
    return out


def _scaling(d: dict) -> list[str]:
    rows = [
        "| synthetic llama, bf16 | parameters | model bytes | calibration s | peak RSS | peak RSS / model bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["scaling"]:
        rows.append(
            f"| {r['size']} | {r['parameters'] / 1e9:.2f} B | {r['model_bytes'] / 1e9:.2f} GB | {r['convert_s']:.0f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_rss_over_model_bytes']:.2f}× |"
        )
    return rows


def _table(t: dict) -> list[str]:
    lines = ["| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in t["rows"]]


def render(name: str, page: Path, key: str | None = None) -> str:
    """The block for results file `name` (its entry `key`, when given) on docs page `page` (links relative to the
    page)."""
    d = json.loads((RESULTS / name).read_text())
    if key is not None:
        if key not in d:
            raise SystemExit(f"bench/tables.py: {name} has no entry {key!r}")
        lines = _table(d[key])
    elif "median" in d and "goals" in d:
        lines = _convert(d)
    elif d.get("scaling"):
        lines = _scaling(d)
    elif d.get("results"):
        lines = _calibrated(d)
    elif "table" in d:  # a bench that renders its own rows: {"table": {"columns": [...], "rows": [[...], ...]}}
        lines = _table(d["table"])
    else:
        raise SystemExit(f"bench/tables.py: no renderer for {name}: give it a 'table' entry")
    link = os.path.relpath(RESULTS / name, page.parent)
    return "\n".join([*lines, "", _source(d) + f" Results: [bench/results/{name}]({link}).", ""])


def rewrite(text: str, page: Path) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("file"), page, m.group("key")) + m.group(5), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a docs table is stale")
    args = ap.parse_args()
    stale = []
    for page in sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]:
        text = page.read_text()
        new = rewrite(text, page)
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"stale tables in {', '.join(stale)}: run python bench/tables.py", file=sys.stderr)
        return 1
    print(("rewrote " if stale else "up to date: ") + (", ".join(stale) or "every table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
