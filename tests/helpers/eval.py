"""Shared test helpers (eval)."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from convert.text.builtin import builtin_text
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


def wikitext_folder(tmp_path: Path) -> Path:
    """A data folder shaped like ../shared/data (wikitext-2/valid.txt and test.txt), from the built-in text."""
    folder = tmp_path / "data" / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "valid.txt").write_text(builtin_text("calibration"))
    (folder / "test.txt").write_text(builtin_text("eval"))
    return folder.parent
