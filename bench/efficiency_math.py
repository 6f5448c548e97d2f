"""The arithmetic of bench/bench_efficiency.py, I/O apart: where a perplexity curve over alpha (uptraining tokens as a
fraction of pretraining tokens) first comes within a tolerance of the original, interpolated in log alpha.
"""

from __future__ import annotations

import math


def crossing(alphas: list[float], ppls: list[float], targets: list[float]) -> dict:
    """The smallest alpha at which `ppls` (one per alpha, measured) reaches `targets` (the goal at each alpha: a
    constant, or a control's perplexity x 1.05).

    The gap ppl - target is interpolated linearly in log alpha between the last grid point above the goal and the
    first at or below it. Returns {"alpha": float | None, "how": str, "between": [lo, hi] | None}; "how" is one of
    "at alpha = 0" (already within), "at a grid point", "interpolated", "at most" (the first trained point already
    reaches it, and the step from 0 cannot be interpolated in log alpha: alpha is an upper bound) or "not reached"
    (alpha None; `between` holds the largest alpha measured).
    """
    if not (len(alphas) == len(ppls) == len(targets)) or not alphas:
        raise ValueError("crossing needs one ppl and one target per alpha, and at least one alpha")
    points = sorted(zip(alphas, ppls, targets))
    if any(a < 0 for a, _, _ in points):
        raise ValueError(f"alphas must be >= 0, got {alphas}")
    previous = None
    for a, p, t in points:
        gap = p - t
        if gap <= 0:
            if previous is None:
                return {"alpha": a, "how": "at alpha = 0" if a == 0 else "at a grid point", "between": None}
            a0, gap0 = previous
            if gap == 0:
                return {"alpha": a, "how": "at a grid point", "between": None}
            if a0 == 0:
                return {"alpha": a, "how": "at most", "between": [a0, a]}
            # gap is linear in log alpha between (log a0, gap0 > 0) and (log a, gap <= 0)
            x0, x1 = math.log(a0), math.log(a)
            x = x0 + (x1 - x0) * gap0 / (gap0 - gap)
            return {"alpha": math.exp(x), "how": "interpolated", "between": [a0, a]}
        previous = (a, gap)
    return {"alpha": None, "how": "not reached", "between": [points[-1][0], points[-1][0]]}


def first_within(tokens: list[int], ppls: list[float], target: float | list[float]) -> int | None:
    """The first measured token count at which ppl <= target (one goal, or one per point), or None. No
    interpolation: the points are evaluations along one run."""
    targets = target if isinstance(target, list) else [target] * len(tokens)
    if not (len(tokens) == len(ppls) == len(targets)):
        raise ValueError("first_within needs one ppl and one target per token count")
    for t, p, goal in sorted(zip(tokens, ppls, targets)):
        if p <= goal:
            return t
    return None


def pct(alpha: float | None, digits: int = 3) -> str:
    """An alpha as a percentage with `digits` significant digits ("-" for None)."""
    if alpha is None:
        return "-"
    if alpha == 0:
        return "0"
    return f"{alpha * 100:.{digits}g}%"
