"""Pure arithmetic of a run: its budget in steps and tokens, and the learning-rate schedule."""

from __future__ import annotations

import math

from convert.uptrain.settings import Settings


def plan_budget(s: Settings, num_processes: int) -> dict:
    """Steps, warmup, global batch and tokens of a run on `num_processes` processes."""
    global_batch = s.micro_batch_size * s.grad_accum * num_processes
    tokens_per_step = global_batch * s.block_tokens  # block_size for causal_lm
    if s.max_steps is not None:
        steps = s.max_steps
    else:
        wanted = s.tokens if s.tokens is not None else s.compute_fraction * s.pretraining_tokens
        steps = max(1, math.ceil(wanted / tokens_per_step))
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_ratio * steps)
    return {
        "global_batch": global_batch,
        "tokens_per_step": tokens_per_step,
        "total_steps": steps,
        "warmup_steps": min(warmup, steps),
        "tokens": steps * tokens_per_step,
        "num_processes": num_processes,
    }


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`.

    Not transformers' `get_cosine_with_min_lr_schedule_with_warmup`: that one ramps `step / warmup`, so the
    first optimizer step runs at learning rate 0 (a step spent for nothing) and every warmup step lags ours by
    one; after warmup the two agree (tests/uptrain/test_settings.py compares them over a whole schedule).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
