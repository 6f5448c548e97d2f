"""Optional dependencies: the parts of gqa-convert that need more than converting, calibrating and evaluating.

The core install converts, calibrates, evaluates and runs the demo. Uptraining needs accelerate and peft
on top: they come with `pip install "gqa-convert[uptrain]"` (also with the `demo`, `test` and `dev` extras).
"""

from __future__ import annotations

import importlib.util

from convert.errors import MissingExtra

# extra -> (module imported, distribution to install); pyproject's [project.optional-dependencies] lists the same.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "uptrain": (("accelerate", "accelerate"), ("peft", "peft")),
}


def missing(extra: str) -> list[str]:
    """The distributions of `extra` that cannot be imported here (found without importing them)."""
    gone = []
    for module, dist in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken package, or one blocked in sys.modules
            found = False
        if not found:
            gone.append(dist)
    return gone


def require_extra(extra: str, what: str | None = None) -> None:
    """Raise MissingExtra naming the install command when `extra`'s dependencies are missing."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(
            f"{what or extra} needs {', '.join(gone)}, not installed with the core package: "
            f'pip install "gqa-convert[{extra}]"'
        )
