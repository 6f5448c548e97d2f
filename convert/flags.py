"""Options declared once, on the settings dataclasses themselves: `flag(...)` puts a field's command-line name,
help and choices in its metadata, and the CLI builds its click options from those fields (`cli.options_from`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any


def flag(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    name: str | None = None,
    short: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option: `--name` (default: the field name with dashes)."""
    return field(default=default, metadata={"help": help, "choices": choices, "name": name, "short": short})
