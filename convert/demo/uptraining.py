"""The demo's uptraining: the calibrated model distilled from the original for about a minute, with the project's
own uptraining library (`convert.uptrain`) driven in-process, as `gqa-convert uptrain` drives it.

Why these settings (measured on SmolLM2-135M GQA-3 -> MQA, see tests/demo/ and the README's demo output):
- distillation alone (`kd_weight` 1): the KL to the original's next-token distribution is a signal on every
  vocabulary entry of every position, where the LM loss of a few thousand tokens is one label each; with LM loss
  only, 6 steps made the perplexity worse and 32 steps were needed for a clear gain;
- only the attention modules train (`train: attention`, q/k/v/o): the merge changed them and nothing else, and
  they are a quarter of the weights of a block, so a minute of Adam at this learning rate moves them without
  disturbing the rest of the model;
- blocks of 256 tokens, one a step: short steps, so that a minute gives tens of them on two cores;
- a constant learning rate after one warmup step, stopped by the wall clock (`max_seconds`), with a floor of
  steps (`min_steps`) so that a slow machine still trains enough to improve.
"""

from __future__ import annotations

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
