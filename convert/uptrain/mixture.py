"""The sources of a run's training data and how a step's rows are shared among them: pure arithmetic.

`data:` is one source (a path, a glob, a list of files of one kind, a hub name) or a weighted mixture, a list of
entries `{source, weight, config, split, text_column}`. A mixture's rows are dealt by exact quotas: over the first
`j` batches of `rows` rows, source k (other than the heaviest) has given `floor(j * rows * w_k)` rows and the
heaviest source the rest. The quota is a pure function of `j`, so a resumed run (or any process) knows every
step's share without replaying the ones before it, and the tokens per source of a whole run are known up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

ENTRY_KEYS = ("source", "weight", "config", "split", "text_column")


@dataclass(frozen=True)
class SourceSpec:
    """One source of training documents (a mixture has several; a plain `data:` is one with weight 1)."""

    source: str | list[str]
    weight: float
    config: str | None
    split: str
    text_column: str

    def describe(self) -> str:
        from convert.text import sources as textdata

        return textdata.describe_source(self.source, self.config, self.split)


def check_entries(value: list[Any]) -> list[dict] | str:
    """A mixture as YAML gave it: its entries normalised, or the one problem with it (naming the fix)."""
    entries = []
    for i, entry in enumerate(value):
        where = f"data[{i}]"
        if not isinstance(entry, dict):
            return f"{where} must be a mapping {{source: ..., weight: ...}} in a mixture, got {entry!r}"
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            return f"{where} has unknown key(s) {', '.join(unknown)}: a mixture entry takes {', '.join(ENTRY_KEYS)}"
        if not entry.get("source"):
            return f"{where} names no source: give source: a file, a glob, a list of files or a hub dataset"
        weight = entry.get("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            return f"{where} weight must be a number, got {weight!r}"
        if not weight > 0:
            return f"{where} weight must be positive, got {weight:g}: drop the source or give it a share above 0"
        entries.append({**entry, "weight": weight})
    if not entries:
        return "data is an empty list: name at least one source"
    return entries


def source_specs(s) -> list[SourceSpec]:
    """The run's sources from its settings: entries of a mixture inherit the top-level config, split, column."""
    if isinstance(s.data, list) and s.data and isinstance(s.data[0], dict):
        return [
            SourceSpec(
                e["source"],
                e["weight"],
                e.get("config", s.data_config),
                e.get("split") or s.data_split,
                e.get("text_column") or s.text_column,
            )
            for e in s.data
        ]
    return [SourceSpec(s.data, 1.0, s.data_config, s.data_split, s.text_column)]


def exact_weights(weights: list[float]) -> list[Fraction]:
    """The weights normalised to sum to 1, as fractions (the quotas are integer arithmetic on every machine)."""
    fractions = [Fraction(w).limit_denominator(1_000_000) for w in weights]
    total = sum(fractions)
    return [f / total for f in fractions]


def heaviest(weights: list[Fraction]) -> int:
    return max(range(len(weights)), key=lambda k: (weights[k], -k))


def cumulative(j: int, rows: int, weights: list[Fraction]) -> list[int]:
    """Rows each source gave over the first `j` batches of `rows` rows."""
    top = heaviest(weights)
    counts = [int(j * rows * w) if k != top else 0 for k, w in enumerate(weights)]  # int() floors a Fraction >= 0
    counts[top] = j * rows - sum(counts)
    return counts


def batch_counts(j: int, rows: int, weights: list[Fraction]) -> list[int]:
    """Rows of each source in batch `j` (0-based)."""
    before, after = cumulative(j, rows, weights), cumulative(j + 1, rows, weights)
    return [b - a for a, b in zip(before, after)]


def quota_problem(rows: int, weights: list[Fraction]) -> str | None:
    """Why batches of `rows` rows cannot follow these weights (the heaviest source would owe rows), or None."""
    if len(weights) == 1:
        return None
    top = heaviest(weights)
    others = sum(-(-rows * w.numerator // w.denominator) for k, w in enumerate(weights) if k != top)  # ceilings
    if others > rows:
        return (
            f"a mixture of {len(weights)} sources needs at least {others} rows a batch for these weights, got {rows}: "
            f"raise micro_batch_size or grad_accum, or give the light sources more weight"
        )
    return None


def rows_per_source(steps: int, rows: int, weights: list[Fraction], parts: int = 1) -> list[int]:
    """Rows each source gives over `steps` steps, when `parts` streams (workers) take turns at the steps."""
    total = [0] * len(weights)
    for p in range(parts):
        served = (steps - p + parts - 1) // parts  # steps s with (s - 1) % parts == p
        total = [t + c for t, c in zip(total, cumulative(served, rows, weights))]
    return total
