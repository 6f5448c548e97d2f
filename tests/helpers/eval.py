"""Shared test helpers (eval)."""

from __future__ import annotations

import functools
from collections import Counter

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.helpers.tiny import save, tiny_model


@functools.cache
def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the most common words of the text (built offline, no download). Built once per
    size: the tests only save it."""
    from convert.text.builtin import builtin_text

    words = builtin_text("eval").split()
    counts = Counter(words)
    common = sorted(set(words[:20000]), key=lambda w: (-counts[w], w))  # most common first, ties by spelling
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in common[: vocab_size - 3]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make(tmp_path, name: str, zero_head: bool = False, **overrides):
    model = tiny_model("llama", **overrides)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()  # every logit 0: uniform over the vocabulary, perplexity = vocab size
    folder = save(model, tmp_path / name)
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder
