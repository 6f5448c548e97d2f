"""The Hugging Face hub around a conversion: reading a repository without its weights (`remote`), the model card
with the source's licence (`card`), and publishing an output (`publish`). Importing this package is free: each
module imports huggingface_hub only inside the functions that use it."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path


def _any_case(word: str) -> str:
    """An fnmatch pattern matching `word` in any case (huggingface_hub's allow_patterns are case-sensitive)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# The licence and use-policy files a repository carries (LICENSE, LICENSE.txt, license.md, LICENCE, NOTICE,
# USE_POLICY.md, ...): the terms of the source apply to the converted weights, so they travel with them.
LEGAL_FILES = [_any_case(w) + "*" for w in ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY", "COPYING")]

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_SNAPSHOT = re.compile(r"models--([\w.-]+)--([\w.-]+)/snapshots/([0-9a-f]{40})")


def hub_origin(folder: Path) -> tuple[str, str] | None:
    """(hub id, commit) of a folder that is a snapshot of the hub cache (`models--org--name/snapshots/SHA`), else
    None: a model passed as its cached folder keeps its provenance."""
    m = _SNAPSHOT.search(Path(folder).resolve().as_posix()) or _SNAPSHOT.search(Path(folder).as_posix())
    return (f"{m.group(1)}/{m.group(2)}", m.group(3)) if m else None


@contextlib.contextmanager
def hub_progress(enabled: bool) -> Iterator[None]:
    """huggingface_hub's progress bars off for the block unless `enabled`, as they were afterwards (a library call
    leaves no process-wide state changed). Imports huggingface_hub only when turning them off."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
