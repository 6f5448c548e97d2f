"""`gqa-convert eval` for encoder-decoder models (T5): held-out span-corruption loss, decode speed and both caches.

Quality is T5's own objective on held-out text: the text is cut into runs and corrupted with one fixed seed, so
every model (with the same tokenizer) is scored on exactly the same inputs, masks and targets; the loss is the
mean cross-entropy over the target tokens, teacher-forced, and `perplexity` is its exponential.

Decode speed is measured with the encoder output fixed: the encoder runs once, outside the clock, and `generate`
decodes from it, so the rate is the decoder's alone (self-attention over the generated tokens, cross-attention
over the input). The cache is measured after decoding, its two halves apart: self-attention (grows with the
generated tokens) and cross-attention (grows with the input length).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from convert.eval.common import (
    DEFAULT_CONTEXTS,
    Decode,
    ModelEval,
    PeakMemory,
    cache_bytes,
    eval_device,
    find_tokenizer,
    model_facts,
    refuse_shipped_code,
    short_of_text,
    text_ids,
)
from convert.text.span_corruption import SpanCorruption, corrupt_stream, sentinel_ids

SEED = 0  # the masks of every scored example: one seed for every model


@dataclass
class Seq2SeqDecode(Decode):
    self_cache_bytes: int = 0  # the decoder's self-attention cache after decoding
    cross_cache_bytes: int = 0  # the cross-attention cache: K/V of every input token


@dataclass
class Seq2SeqEval(ModelEval):
    objective: str = "span_corruption"
    span_loss: float = 0.0  # mean cross-entropy per target token; perplexity = exp(span_loss)
    input_length: int = 0
    target_length: int = 0
    self_cache_bytes_per_token: int = 0  # per generated token
    cross_cache_bytes_per_token: int = 0  # per input token
    decode: list[Seq2SeqDecode] = field(default_factory=list)

    def scoring(self) -> str:
        return (
            f"span corruption: {self.windows} held-out examples x {self.input_length} input / {self.target_length} "
            f"target tokens (noise density 0.15, mean span 3, seed {SEED}), {self.tokens} target tokens scored; "
            f"'ppl' is exp(loss per target token)"
        )


def is_encoder_decoder(path: str) -> bool:
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("is_encoder_decoder", False))


@torch.no_grad()
def span_loss(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 8) -> float:
    """Mean cross-entropy per target token (teacher forcing), inputs [N, L_in], targets [N, L_tgt]."""
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
        logits = model(input_ids=x, labels=y).logits  # labels: the model shifts them right itself
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


@torch.no_grad()
def measure_seq2seq_decode(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> Seq2SeqDecode:
    """Decode rate from a fixed encoder output: (time for 1 + n tokens - time for 1 token) / n."""
    x = prompt[None].to(device)
    encoded = model.get_encoder()(input_ids=x)  # outside the clock: the encoder output is fixed
    kwargs = dict(encoder_outputs=encoded, do_sample=False, return_dict_in_generate=True)
    kwargs["pad_token_id"] = model.config.pad_token_id

    def timed(n: int):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model.generate(max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    timed(2)  # warm-up
    t1, _ = timed(1)
    with PeakMemory(device) as mem:
        tn, out = timed(1 + new_tokens)
    cache = getattr(out, "cache", None) or out.past_key_values
    own, cross = cache_bytes(cache.self_attention_cache), cache_bytes(cache.cross_attention_cache)
    rate = new_tokens / max(tn - t1, 1e-9)
    return Seq2SeqDecode(len(prompt), new_tokens, rate, own + cross, mem.peak, own, cross)


def evaluate_seq2seq(
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
) -> Seq2SeqEval:
    """`causal.evaluate_causal` for an encoder-decoder: `window` is the input length of a span-corruption example,
    `max_windows` the number of examples (None: 8), `contexts` the input lengths of the decode measurement (None:
    DEFAULT_CONTEXTS, each left out where the text is too short; given ones are all measured or refused)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    del stride  # an example is scored whole
    refuse_shipped_code(path, trust_remote_code)
    dev = eval_device(device)
    tok = AutoTokenizer.from_pretrained(find_tokenizer(path, tokenizer), trust_remote_code=trust_remote_code)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(dev).eval()
    settings = SpanCorruption(input_length=window)
    examples = max_windows or 8
    wanted = DEFAULT_CONTEXTS if contexts is None else contexts
    ids, _ = text_ids(tok, data, max(examples * settings.raw_length, *wanted, 1))
    sentinels = sentinel_ids(tok, settings.num_spans)
    inputs, targets = corrupt_stream(ids.numpy().astype(np.int64), settings, sentinels, tok.eos_token_id, SEED)
    inputs, targets = torch.from_numpy(inputs[:examples]).to(dev), torch.from_numpy(targets[:examples]).to(dev)
    loss = span_loss(model, inputs, targets)

    facts = model_facts(path, model)  # T5's "layers" are the decoder's self + cross modules, so the bytes per
    per_token = facts["kv_cache_bytes_per_token"]  # token are self (per generated) + cross (per input), halves
    result = Seq2SeqEval(
        **facts,
        perplexity=float(np.exp(min(loss, 700))),
        tokens=targets.numel(),
        windows=len(inputs),
        window=settings.input_length,
        stride=settings.input_length,
        span_loss=loss,
        input_length=settings.input_length,
        target_length=settings.target_length,
        self_cache_bytes_per_token=per_token // 2,
        cross_cache_bytes_per_token=per_token // 2,
    )
    for context in wanted:
        if short_of_text(context, len(ids), data, contexts is not None, path, result.left_out):
            continue
        result.decode.append(measure_seq2seq_decode(model, ids[:context], new_tokens, dev))
    del model
    gc.collect()
    return result
