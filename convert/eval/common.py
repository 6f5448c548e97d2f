"""What every evaluation shares: the result rows, the text and tokenizer, the length checks, memory and cache sizes."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from convert.eval.perplexity import tokenize_file
from convert.families import family_for, shapes_for
from convert.pipeline.merge import kv_cache_bytes_per_token
from convert.text import sources as textdata
from convert.text.builtin import builtin_text

DEFAULT_CONTEXTS = (128, 512, 2048)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Decode:
    context: int
    new_tokens: int
    tokens_per_s: float
    kv_cache_bytes: int  # measured: every tensor the cache holds after decoding
    peak_memory_bytes: int  # peak RSS (CPU) or peak allocated (CUDA) while decoding


@dataclass
class ModelEval:
    model: str
    model_type: str
    parameters: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    kv_cache_bytes_per_token: int  # from the config: 2 * layers * KV heads * head_dim * element size
    perplexity: float
    tokens: int
    windows: int
    window: int
    stride: int
    decode: list[Decode] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # default contexts the model (or the text) is too short for


def eval_device(device: str) -> torch.device:
    """`auto`: CUDA when there is one, else the CPU; any other name as torch spells it (cpu, cuda, cuda:1)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def text_ids(tokenizer, data: str | None, max_tokens: int | None) -> tuple[torch.Tensor, str]:
    """Token ids to score (at most `max_tokens`; None: the whole text), and where they came from.

    A `.txt` file is tokenized whole, as written (the protocol of the README's WikiText numbers); other sources
    go through `convert.text.sources` in their own order; no source means the pydoc text that ships with Python.
    """
    if data is None:
        ids = tokenizer(builtin_text("eval"), add_special_tokens=False, return_tensors="pt").input_ids[0]
        return ids[:max_tokens], "pydoc_data topics (second half)"
    if data.endswith(".txt") and Path(data).is_file():
        return tokenize_file(tokenizer, data, max_tokens), data
    if max_tokens is not None:
        return textdata.sample_token_ids(data, tokenizer, max_tokens, seed=None), data
    eos = textdata.eos_token_id(tokenizer)
    texts = textdata.iter_texts(textdata.load_text_dataset(data))
    ids = [i for doc in textdata.tokenize_documents(texts, tokenizer) for i in (*doc, eos)]
    return torch.tensor(ids, dtype=torch.long), data


def positions(config) -> int | None:
    """The longest sequence the model's positions cover, from its config (None: not bounded by the config)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_tokenizer(path: str, tokenizer: str | None) -> str:
    """Where to load the tokenizer from: `tokenizer` when given, else the model folder, which must hold one."""
    if tokenizer is not None:
        return tokenizer
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"model folder {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): pass "
            f"--tokenizer with the original model's folder or hub id (a converted model keeps its tokenizer), "
            f"or save it there: AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({str(path)!r})"
        )
    return path


def check_lengths(path: str, config, window: int, contexts: tuple[int, ...] | None, new_tokens: int) -> None:
    """Refuse, by name, a window or an asked-for context longer than the model's positions."""
    limit = positions(config)
    if limit is None:
        return
    if window > limit:
        raise ValueError(
            f"--window {window} is longer than {path} can attend over ({limit} positions, max_position_embeddings): "
            f"use --window {limit} or less"
        )
    for context in contexts or ():
        if context + new_tokens > limit:
            raise ValueError(
                f"--contexts {context}: {context} + {new_tokens} new tokens need {context + new_tokens} positions, "
                f"{path} has {limit} (max_position_embeddings): use contexts up to {limit - new_tokens} or fewer "
                f"--new-tokens"
            )


class PeakMemory:
    """Peak memory while a block runs: CUDA's own counter, or RSS sampled every 5 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache object (its layers' key and value tensors)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def refuse_shipped_code(path: str | Path, trust_remote_code: bool) -> None:
    """A folder whose config.json names its own modeling code (auto_map) loads only when that code is trusted."""
    config = Path(path) / "config.json"
    auto_map = json.loads(config.read_text()).get("auto_map") if config.is_file() else None
    if auto_map and not trust_remote_code:
        files = sorted({v.split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)})
        raise ValueError(
            f"MODEL {path} ships its own modeling code ({', '.join(files)}), which loading would run: "
            "read it, then pass --trust-remote-code to evaluate it"
        )


def model_facts(path: str, model) -> dict:
    """What a result row says about the model itself: name, type, size, heads, dtype, KV-cache bytes per token."""
    cfg = model.config
    s = shapes_for(family_for(cfg.model_type), cfg)
    dtype = next(model.parameters()).dtype
    return dict(
        model=str(path),
        model_type=cfg.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads,
        dtype=str(dtype).removeprefix("torch."),
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(s, s.num_kv_heads, dtype),
    )


def short_of_text(context: int, tokens: int, data: str | None, asked: bool, path: str, left_out: list[str]) -> bool:
    """Whether the text's `tokens` are too few for a decode at `context`: an `asked` context (--contexts) raises,
    a default one is noted in `left_out` and skipped."""
    if context <= tokens:
        return False
    why = f"context {context} needs {context} tokens of text, {data or 'the default text'} gave {tokens}"
    if asked:
        raise ValueError(f"--contexts {context}: {why}; give more text with --data or a shorter context")
    left_out.append(f"{why}: left out for {path}")
    return True
