"""The demo's uptraining: the calibrated model distilled from the original for about a minute, with the project's
own uptraining library (`convert.uptrain`) driven in-process, as `gqa-convert uptrain` drives it.

Why these settings (measured on SmolLM2-135M GQA-3 -> MQA calibrated on 4096 tokens, validation perplexity on
512 tokens of the held-out half; bench/results/demo-uptrain-032e46e.json):
- distillation alone (`kd_weight` 1): the KL to the original's next-token distribution is a signal on every
  vocabulary entry of every position, where the LM loss of a few thousand tokens is one label each. The demo's
  earlier LM-loss uptraining (full model, lr 3e-4) made the perplexity worse in 6 steps and needed 32 for a clear
  gain; distilled, the perplexity falls from the first steps (99.2 -> 83.2 after 4, 75.0 after 8, 72.2 after 16);
- only the attention modules train (`train: attention`, q/k/v/o): the merge changed them and nothing else; they are
  a fifth of a block's weights, and no MLP weight gradient is computed;
- lr 1e-4: 3e-4 gave about the same perplexity after 8 steps (74.1) with a higher KL to the original (0.90
  against 0.84); 1e-3 raised the perplexity after 5 steps;
- blocks of 256 tokens, one a step: short steps, so that a minute holds as many as it can (18 s a step measured
  on two cores shared with three other jobs, load average 6-9; a quiet machine runs several times faster);
- a constant learning rate after one warmup step, stopped by the wall clock (`max_seconds`), with a floor of 8
  steps (`min_steps`), so that a slow machine still trains enough to improve.

Why in-process and not `accelerate launch`: one CPU process is what `uptrain()` runs without a launcher, and a
second Python process would pay the imports and model loading again out of the demo's three minutes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from convert.text.builtin import builtin_text

UPTRAIN_SECONDS = 60.0
MIN_STEPS = 8  # the floor: fewer steps than this did not reliably lower the perplexity
MAX_STEPS = 400  # the planned budget; the wall clock stops the run long before on a CPU
LR = 1e-4
BLOCK_SIZE = 256
KD_WEIGHT = 1.0
TRAIN = "attention"
TRAIN_TEXT = "pydoc_data topics (first half)"


def uptrain_calibrated(
    model: Path, teacher: Path, root: Path, seconds: float, progress: bool, min_steps: int = MIN_STEPS
) -> tuple[Path, dict[str, Any]]:
    """Distill `model` from `teacher` (its original) for about `seconds` of training on the first half of the
    built-in text, which the demo never scores; the uptrained folder and what the run did."""
    from convert.uptrain import Options, Settings, uptrain

    root.mkdir(parents=True, exist_ok=True)
    # The demo's own folder, rewritten on every run like its mean/ and calibrated/ conversions.
    shutil.rmtree(root / "uptrained", ignore_errors=True)
    data = root / "builtin-train.txt"
    data.write_text(builtin_text("calibration"), encoding="utf-8")
    settings = Settings(
        model=str(model),
        teacher=str(teacher),
        kd_weight=KD_WEIGHT,
        train=TRAIN,
        output_dir=str(root / "uptrained"),
        data=str(data),
        txt_documents="paragraphs",
        max_eval_blocks=1,  # the demo scores the result itself, on the other half of the text
        block_size=BLOCK_SIZE,
        micro_batch_size=1,
        max_steps=MAX_STEPS,
        max_seconds=seconds,
        min_steps=min_steps,
        lr=LR,
        warmup_steps=1,
        min_lr_ratio=1.0,  # constant after warmup: the clock, not the schedule, ends the run
        num_workers=0,  # the batches are cut from memory; a worker process would only compete for the 2 cores
        eval_every=0,
        save_every=0,
        report_to="none",
        resume="never",
    )
    summary = uptrain(settings, Options(quiet=not progress))
    return Path(summary["model_dir"]), {
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_seconds": round(summary["train_seconds"], 1),
        "max_seconds": seconds,
        "min_steps": min_steps,
        "stopped_early": summary["stopped_early"],
        "data": TRAIN_TEXT,
        "teacher": "the original",
        "kd_weight": KD_WEIGHT,
        "train": TRAIN,
        "lr": LR,
        "block_size": BLOCK_SIZE,
    }
