"""`gqa-convert eval` for decoder-only models: perplexity on fixed windows, decode speed with the KV cache."""

from __future__ import annotations

import gc
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from convert.eval.common import (
    DEFAULT_CONTEXTS,
    Decode,
    ModelEval,
    PeakMemory,
    cache_bytes,
    check_lengths,
    eval_device,
    find_tokenizer,
    model_facts,
    positions,
    refuse_shipped_code,
    short_of_text,
    text_ids,
)
from convert.eval.perplexity import perplexity


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


def evaluate_causal(
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
    refuse_shipped_code(path, trust_remote_code)

    dev = eval_device(device)
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
