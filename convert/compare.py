"""`gqa-convert eval`: quality against KV-cache memory and decode speed, for several models side by side."""

from __future__ import annotations

import gc
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from .evaluate import builtin_text, perplexity

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


def text_ids(tokenizer, data: str | None, max_tokens: int | None) -> tuple[torch.Tensor, str]:
    """Token ids to score (at most `max_tokens`; None: the whole text), and where they came from.

    A `.txt` file is tokenized whole, as written (the protocol of the README's WikiText numbers); other sources
    go through `convert.data` in their own order; no source means the pydoc text that ships with Python.
    """
    if data is None:
        ids = tokenizer(builtin_text("eval"), add_special_tokens=False, return_tensors="pt").input_ids[0]
        return ids[:max_tokens], "pydoc_data topics (second half)"
    if data.endswith(".txt") and Path(data).is_file():
        from .evaluate import tokenize_file

        return tokenize_file(tokenizer, data, max_tokens), data
    from . import data as textdata

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


@torch.no_grad()
def measure_decode(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> Decode:
    """Decode speed with `generate` and its cache: (time for 1 + n tokens - time for 1 token) / n.

    Subtracting the 1-token run removes the prefill, so the rate is that of the cached decode steps alone.
    """
    x = prompt[None].to(device)
    kwargs = dict(do_sample=False, pad_token_id=model.config.eos_token_id, return_dict_in_generate=True)

    def timed(n: int):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    timed(2)  # warm-up: first-call allocations and kernel selection
    t1, _ = timed(1)
    with PeakMemory(device) as mem:
        tn, out = timed(1 + new_tokens)
    rate = new_tokens / max(tn - t1, 1e-9)
    return Decode(len(prompt), new_tokens, rate, cache_bytes(out.cache), mem.peak)


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
    from .core import kv_cache_bytes_per_token
    from .families import family_for, shapes_for

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


def evaluate_model(
    path: str,
    data: str | None = None,
    window: int = 512,
    stride: int | None = None,
    max_windows: int | None = 8,
    contexts: tuple[int, ...] | None = None,
    new_tokens: int = 32,
    device: str = "auto",
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
) -> ModelEval:
    """Perplexity and decode measurements of one model.

    `contexts` None: DEFAULT_CONTEXTS, each left out (and named in `left_out`) where the model's positions or the
    text are too short for it. Contexts given explicitly are all measured, or refused with a ValueError.
    `max_windows` None scores every window of the text.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .compare_seq2seq import evaluate_seq2seq, is_encoder_decoder

    if is_encoder_decoder(path):  # T5: span-corruption loss, decode from a fixed encoder output
        return evaluate_seq2seq(
            path, data, window, stride, max_windows, contexts, new_tokens, device, tokenizer, trust_remote_code
        )
    refuse_shipped_code(path, trust_remote_code)

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    check_lengths(path, config, window, contexts, new_tokens)
    tok = AutoTokenizer.from_pretrained(find_tokenizer(path, tokenizer), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(dev).eval()
    cfg = model.config
    wanted = DEFAULT_CONTEXTS if contexts is None else contexts
    need = None if max_windows is None else max([window * max_windows + 1, *wanted])
    ids, _ = text_ids(tok, data, need)
    ppl = perplexity(model, ids, window, stride, max_windows)
    result = ModelEval(
        **model_facts(path, model),
        perplexity=ppl.ppl,
        tokens=ppl.tokens,
        windows=ppl.windows,
        window=ppl.window,
        stride=ppl.stride,
    )
    limit = positions(cfg)
    for context in wanted:
        if limit is not None and context + new_tokens > limit:  # only a default context gets here
            result.left_out.append(
                f"context {context} left out for {path}: {context} + {new_tokens} new tokens exceed its {limit} "
                f"positions (max_position_embeddings)"
            )
            continue
        if short_of_text(context, len(ids), data, contexts is not None, path, result.left_out):
            continue
        result.decode.append(measure_decode(model, ids[:context], new_tokens, dev))
    del model
    gc.collect()
    return result


def compare(models: list[str], **options) -> list[ModelEval]:
    """Evaluate each model with the same text and settings, one after the other (one in memory at a time).

    Every model's lengths and tokenizer are checked first, so a bad one fails before the others are measured.
    Encoder-decoders (span-corruption loss) and decoder-only models (perplexity) are not mixed in one table.
    """
    from transformers import AutoConfig

    from .compare_seq2seq import is_encoder_decoder

    kinds = {m: "encoder-decoder" if is_encoder_decoder(m) else "decoder-only" for m in models}
    if len(set(kinds.values())) > 1:  # perplexity and span-corruption loss are not one scale
        listed = ", ".join(f"{m} ({k})" for m, k in kinds.items())
        raise ValueError(f"compare encoder-decoder models with each other and decoder-only with each other: {listed}")
    trust = options.get("trust_remote_code", False)
    for m in models:
        refuse_shipped_code(m, trust)
        if kinds[m] == "decoder-only":  # T5's relative positions have no length limit to check
            check_lengths(
                m,
                AutoConfig.from_pretrained(m, trust_remote_code=trust),
                options.get("window", 512),
                options.get("contexts"),
                options.get("new_tokens", 32),
            )
        find_tokenizer(m, options.get("tokenizer"))
    return [evaluate_model(m, **options) for m in models]


def as_dicts(results: list[ModelEval]) -> list[dict]:
    """JSON-ready rows, each with ratios to the first model."""
    base = results[0]
    rows = []
    for r in results:
        row = asdict(r)
        row["ratio_to_first"] = {
            "perplexity": r.perplexity / base.perplexity,
            "kv_cache_bytes_per_token": r.kv_cache_bytes_per_token / base.kv_cache_bytes_per_token,
        }
        first = {b.context: b for b in base.decode}
        for d in row["decode"]:  # paired by context length: either model may have left a context out
            b = first.get(d["context"])
            d["speedup_vs_first"] = d["tokens_per_s"] / b.tokens_per_s if b else None
        rows.append(row)
    return rows


def format_table(results: list[ModelEval]) -> str:
    """One Markdown table: quality, KV cache, decode speed per context, with ratios to the first model."""
    base = results[0]
    contexts = sorted({d.context for r in results for d in r.decode})
    first = {d.context: d for d in base.decode}
    head = ["model", "KV heads", "ppl", "ppl ×", "KV B/token", "KV ×"]
    head += [f"tok/s @{c}" for c in contexts] + [f"peak MB @{contexts[-1]}"] if contexts else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            Path(r.model).name or r.model,
            str(r.num_kv_heads),
            f"{r.perplexity:.2f}",
            f"{r.perplexity / base.perplexity:.2f}",
            f"{r.kv_cache_bytes_per_token:,}",
            f"{r.kv_cache_bytes_per_token / base.kv_cache_bytes_per_token:.2f}",
        ]
        speeds = {d.context: d for d in r.decode}
        for c in contexts:
            d, b = speeds.get(c), first.get(c)
            ratio = f" ({d.tokens_per_s / b.tokens_per_s:.2f}×)" if d and b else ""
            cells.append(f"{d.tokens_per_s:.1f}{ratio}" if d else "-")
        if contexts:
            last = speeds.get(contexts[-1])
            cells.append(f"{last.peak_memory_bytes / 1e6:.0f}" if last else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
