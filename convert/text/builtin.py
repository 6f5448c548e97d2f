"""Offline default text: English that ships with every Python, split so calibration and evaluation never share it."""

from __future__ import annotations

from pydoc_data.topics import topics


def builtin_text(part: str = "eval") -> str:
    """English text that ships with every Python: the pydoc topic pages (~465 KB), for offline defaults.

    Topics are sorted by name and split in two halves, so that calibration ("calibration") and evaluation
    ("eval") never read the same text.
    """
    names = sorted(topics)
    half = len(names) // 2
    chosen = names[:half] if part == "calibration" else names[half:]
    if part not in ("eval", "calibration"):
        raise ValueError(f"part must be 'eval' or 'calibration', got {part!r}")
    return "\n\n".join(topics[n] for n in chosen)
