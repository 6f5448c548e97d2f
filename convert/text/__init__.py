"""Text shared by evaluation, calibration and uptraining.

sources.py          local files or a hub dataset through `datasets`; documents, shuffling, packing
span_corruption.py  T5's denoising objective as pure, seeded functions on token ids
"""
