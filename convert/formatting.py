"""Numbers for people: sizes, counts and durations, written the same way by the CLI, uptraining and the benches."""

from __future__ import annotations


def human_count(n: float, unit: str = "") -> str:
    """Three significant digits with an SI prefix: 38400 -> '38.4K', 4e21 FLOP -> '4ZFLOP'."""
    for prefix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000:
            return f"{n:.3g}{prefix}{unit}"
        n /= 1000
    return f"{n:.3g}Z{unit}"


def human_bytes(n: float) -> str:
    """Decimal byte units: 512 -> '512 B', 1_234_567 -> '1.23 MB' (TB is the largest)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def duration(seconds: float) -> str:
    """Whole seconds as '3m05s', or '1h02m03s' from an hour on."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
