"""The calibrated method's command-line options, declared once and torch-free: `CalibratedOptions` takes its
choices from here, and the CLI builds its flags from `CalibrationFlags` (None: the method's own default)."""

from __future__ import annotations

from dataclasses import dataclass

from convert.flags import flag

GROUPINGS = ("contiguous", "similarity")
CALIBRATION_DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class CalibrationFlags:
    """The options of `--method calibrated` that the command line exposes."""

    calibration_data: str | None = flag(
        None,
        "Calibrated methods: text to calibrate on, a .txt/.jsonl/.json/.parquet file or a hub dataset "
        "(default 'builtin': Python's pydoc text, offline; 'random': random token ids).",
    )
    calibration_tokens: int | None = flag(None, "Calibrated methods: tokens to calibrate on (default 8192).")
    grouping: str | None = flag(
        None, "Calibrated methods: which KV heads share a group (default contiguous).", choices=GROUPINGS
    )
    calibration_dtype: str | None = flag(
        None,
        "Calibrated methods: dtype the layers run in while calibrating (default float32; bfloat16 is fast only "
        "on CPUs with native bf16 and on GPUs).",
        choices=CALIBRATION_DTYPES,
    )
    device: str | None = flag(
        None,
        "Calibrated methods: where the layers run while calibrating (default cpu; auto: cuda when available).",
        choices=DEVICES,
    )
