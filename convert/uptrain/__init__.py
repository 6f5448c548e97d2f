"""Uptraining: budgeted continued pretraining of a converted GQA/MQA checkpoint, on one process or many.

    from convert.uptrain import Settings, uptrain
    summary = uptrain(Settings(model="runs/mqa", output_dir="runs/mqa-up", data="train.txt", max_steps=100))

From a shell: `accelerate launch -m convert.uptrain CONFIG.yaml key=value ...` (any number of processes),
`gqa-convert uptrain CONFIG.yaml ...` (one process), or `accelerate launch recipes/uptrain.py ...` in a checkout.
"""

import sys

from convert.errors import MissingExtra
from convert.extras import require_extra

try:
    require_extra("uptrain", "uptraining")  # before the modules below import accelerate and peft
except MissingExtra as e:
    # `python -m convert.uptrain` (or `accelerate launch -m`): runpy imports this package before __main__, with
    # sys.argv[0] set to "-m" meanwhile, so the message is given here, as the CLI gives it, without a traceback.
    if sys.argv[:1] == ["-m"]:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise

from convert.uptrain.loop import Hooks, main, uptrain
from convert.uptrain.settings import Options, Settings, load_settings, make_settings
from convert.uptrain.summary import Summary

__all__ = [
    "Hooks",
    "Options",
    "Settings",
    "Summary",
    "load_settings",
    "main",
    "make_settings",
    "uptrain",
]
