"""The T5 half of bench/replicate_paper.py (`--arch t5`): the paper's own architecture, a small T5.1.1 (gated-gelu
feed-forward, untied head, relative position bias), trained and scored with T5's span-corruption objective.

    tokenizer  byte-level BPE with T5's specials: <pad> (0, the decoder start), </s> (1), <extra_id_0..99>
    model      T5ForConditionalGeneration from a T5Config: encoder and decoder of cfg.num_layers blocks each
    training   convert.uptrain with objective=span_corruption; block_size is the encoder input length and a
               row costs input + target tokens in the budget (pretraining tokens D and alpha x D alike)
    score      held-out span-corruption loss: the test text corrupted with one fixed seed (the same masks for
               every model), examples evenly spaced; "ppl" is exp(mean cross-entropy per target token)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from replication_analysis import Config
from replication_setup import train_bpe

from convert.eval.seq2seq import SEED, span_loss
from convert.text.span_corruption import SENTINEL, SpanCorruption, corrupt_stream, sentinel_ids

PAD, EOS, SENTINELS = "<pad>", "</s>", 100


def train_t5_tokenizer(text_file: Path, vocab_size: int, folder: Path):
    """A byte-level BPE trained on the training text, with T5's pad, eos and sentinel tokens (deterministic)."""
    specials = [PAD, EOS] + [SENTINEL.format(i) for i in range(SENTINELS)]
    return train_bpe(text_file, vocab_size, folder, specials, eos_token=EOS, pad_token=PAD)


def init_t5(cfg: Config, tokenizer, folder: Path) -> int:
    """A randomly initialised multi-head T5.1.1 saved beside the tokenizer; returns its parameters."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.hidden_size,
        d_kv=cfg.head_dim,
        d_ff=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.pretrain_seed)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def t5_test_examples(tokenizer, path: Path, input_length: int, examples: int) -> tuple[tuple, dict]:
    """Held-out span-corruption examples of the test text (seed SEED), evenly spaced: ((inputs, targets), info)."""
    from convert.eval.perplexity import tokenize_file

    span = SpanCorruption(input_length=input_length)
    ids = tokenize_file(tokenizer, str(path)).numpy().astype(np.int64)
    total = len(ids) // span.raw_length
    if total < 1:
        raise SystemExit(f"error: {path} has {len(ids)} tokens, fewer than one example ({span.raw_length})")
    sentinels = sentinel_ids(tokenizer, span.num_spans)
    inputs, targets = corrupt_stream(ids, span, sentinels, tokenizer.eos_token_id, SEED)
    chosen = (
        list(range(total)) if examples == 0 or examples >= total else [i * total // examples for i in range(examples)]
    )
    info = {
        "file": str(path),
        "file_tokens": len(ids),
        "window": span.input_length,
        "stride": span.raw_length,
        "target_length": span.target_length,
        "windows": len(chosen),
        "windows_in_file": total,
        "tokens_scored": len(chosen) * span.target_length,
        "objective": f"span corruption (noise density 0.15, mean span 3, seed {SEED})",
    }
    return (torch.from_numpy(inputs[chosen]), torch.from_numpy(targets[chosen])), info


def score_t5(folder: Path, examples: tuple) -> dict:
    """Span-corruption loss per target token of a T5 folder (shipped gqa_t5 code trusted: this bench wrote it)."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    inputs, targets = examples
    nll = span_loss(model, inputs, targets, batch_size=16)
    del model
    return {"ppl": math.exp(min(nll, 700)), "nll": nll, "scored_tokens": targets.numel()}
