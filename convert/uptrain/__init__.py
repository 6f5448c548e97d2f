"""Uptraining: budgeted continued pretraining of a converted GQA/MQA checkpoint, on one process or many.

    from convert.uptrain import Settings, uptrain
    summary = uptrain(Settings(model="runs/mqa", output_dir="runs/mqa-up", data="train.txt", max_steps=100))

From a shell: `accelerate launch -m convert.uptrain CONFIG.yaml key=value ...` (any number of processes),
`gqa-convert uptrain CONFIG.yaml ...` (one process), or `accelerate launch recipes/uptrain.py ...` in a checkout.
"""

from convert.uptrain.checkpointing import WriteError
from convert.uptrain.loop import Hooks, TrainingError, main, uptrain
from convert.uptrain.report import Summary
from convert.uptrain.settings import Options, Settings, SettingsError, load_settings, make_settings

__all__ = [
    "Hooks",
    "Options",
    "Settings",
    "SettingsError",
    "Summary",
    "TrainingError",
    "WriteError",
    "load_settings",
    "main",
    "make_settings",
    "uptrain",
]
