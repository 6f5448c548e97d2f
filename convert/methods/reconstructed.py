"""`--method reconstructed`: the calibrated closed-form merge, then block-wise reconstruction of each merged layer
(`convert.methods.reconstruct`). `--method calibrated` stays the closed form alone, for comparison."""

from __future__ import annotations

from pydantic import Field

from convert.methods.calibrated import Calibrated, CalibratedOptions

# Passes over the calibration sequences per layer: what the cost budget (<= 6x one float32 forward) allows.
DEFAULT_EPOCHS = 1.0
# The better of 1e-4 and 4e-4 on SmolLM2 MQA (bench/results/reconstructed-bbba12a-smollm2-experiment.json).
DEFAULT_LR = 4e-4


class ReconstructedOptions(CalibratedOptions):
    """Calibrated's options, with block-wise reconstruction on by default (`reconstruct_epochs` = 0 is calibrated)."""

    reconstruct_epochs: float = Field(DEFAULT_EPOCHS, ge=0, le=100)
    reconstruct_lr: float = Field(DEFAULT_LR, gt=0, le=1)


class Reconstructed(Calibrated):
    """Calibrated merge, then each merged layer's q/k/v/o tuned by Adam so that its attention output on the
    calibration text matches the original layer's."""

    name = "reconstructed"
    summary = "calibrated merge, then a few Adam steps per layer on its attention output (block reconstruction)"
    options_class = ReconstructedOptions
