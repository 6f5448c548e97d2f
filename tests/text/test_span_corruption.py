"""T5's span corruption on real tokenizers: exact lengths, sentinels in order, inputs + targets give the text back,
seeded masks, and tokenizers or settings that cannot work refused clearly."""

from __future__ import annotations

import numpy as np
import pytest

from convert.errors import SpanCorruptionError
from convert.text.span_corruption import (
    SENTINEL,
    SpanCorruption,
    corrupt_stream,
    examples,
    noise_mask,
    reconstruct,
    sentinel_ids,
)
from tests.helpers.uptrain import toy_documents, train_tokenizer

SETTINGS = [
    SpanCorruption(),  # T5's own: 0.15, 3, 512
    SpanCorruption(noise_density=0.5, mean_span_length=1.0, input_length=65),
    SpanCorruption(noise_density=0.3, mean_span_length=8.0, input_length=97),
    SpanCorruption(noise_density=0.05, mean_span_length=2.5, input_length=33),
]


def t5_like_tokenizer(docs: list[str], sentinels: int = 100):
    """A BPE tokenizer trained on `docs` with T5's sentinels <extra_id_0..N-1> added as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<pad>", "</s>", "<unk>"] + [SENTINEL.format(i) for i in range(sentinels)]
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return toy_documents(400)


@pytest.fixture(scope="module")
def tokenizer(docs):
    return t5_like_tokenizer(docs)


def stream(tokenizer, docs: list[str]) -> np.ndarray:
    ids = tokenizer("\n\n".join(docs))["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def test_t5_lengths_are_the_published_ones():
    s = SpanCorruption()
    assert (s.raw_length, s.input_length, s.target_length) == (568, 512, 114)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.noise_density}-{s.mean_span_length}-{s.input_length}")
def test_every_example_has_exact_lengths_ordered_sentinels_and_gives_the_text_back(settings, tokenizer, docs):
    ids = stream(tokenizer, docs)
    sentinels = sentinel_ids(tokenizer, settings.num_spans)
    eos = tokenizer.eos_token_id
    inputs, targets = corrupt_stream(ids, settings, sentinels, eos, seed=3)
    n = len(ids) // settings.raw_length
    assert inputs.shape == (n, settings.input_length) and targets.shape == (n, settings.target_length)
    assert (inputs[:, -1] == eos).all() and (targets[:, -1] == eos).all()
    runs = ids[: n * settings.raw_length].reshape(n, settings.raw_length)
    noise, spans = settings.counts(settings.raw_length)
    for i in range(n):
        for row in (inputs[i], targets[i]):  # <extra_id_0>, <extra_id_1>, ... each once, in order
            assert row[np.isin(row, sentinels)].tolist() == sentinels[:spans].tolist()
        assert (~np.isin(targets[i][:-1], sentinels)).sum() == noise  # the hidden tokens, all of them
        np.testing.assert_array_equal(reconstruct(inputs[i], targets[i], sentinels, eos), runs[i])


def test_real_text_comes_back_from_inputs_and_targets(wikitext_valid):
    text = wikitext_valid.read_text(encoding="utf-8")[:200_000]
    docs = [d for d in text.split("\n \n") if d.strip()]
    tokenizer = t5_like_tokenizer(docs)
    settings = SpanCorruption()
    ids = stream(tokenizer, docs)
    sentinels = sentinel_ids(tokenizer, settings.num_spans)
    eos = tokenizer.eos_token_id
    inputs, targets = corrupt_stream(ids, settings, sentinels, eos, seed=0)
    assert len(inputs) > 20
    for i in (0, len(inputs) - 1):
        run = ids[i * settings.raw_length : (i + 1) * settings.raw_length]
        assert tokenizer.decode(reconstruct(inputs[i], targets[i], sentinels, eos)) == tokenizer.decode(run)
        assert "<extra_id_27>" in tokenizer.decode(inputs[i]) and "<extra_id_28>" not in tokenizer.decode(inputs[i])


def test_same_seed_same_masks_other_seed_other_masks(tokenizer, docs):
    settings = SpanCorruption(input_length=64)
    ids = stream(tokenizer, docs)
    sentinels = sentinel_ids(tokenizer, settings.num_spans)
    a = corrupt_stream(ids, settings, sentinels, 1, seed=7)
    b = corrupt_stream(ids, settings, sentinels, 1, seed=7)
    c = corrupt_stream(ids, settings, sentinels, 1, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    # Example i depends on (seed, i) only: a shorter stream gives the same first examples.
    short = corrupt_stream(ids[: 3 * settings.raw_length], settings, sentinels, 1, seed=7)
    np.testing.assert_array_equal(short[0], a[0][:3])


def test_spans_average_the_mean_span_length():
    settings = SpanCorruption(noise_density=0.15, mean_span_length=3.0, input_length=512)
    rng = np.random.default_rng(0)
    masks = np.stack([noise_mask(settings.raw_length, settings, rng) for _ in range(50)])
    starts = masks & ~np.concatenate([np.zeros((50, 1), bool), masks[:, :-1]], axis=1)
    assert masks.sum(1).tolist() == [85] * 50  # round(568 * 0.15)
    assert masks.sum() / starts.sum() == pytest.approx(3.0, abs=0.05)  # 85 tokens in 28 spans, every example
    assert not masks[:, 0].any()  # kept tokens come first
    assert len({m.tobytes() for m in masks}) == 50


def test_examples_read_sentinels_and_eos_from_the_tokenizer(tokenizer, docs):
    settings = SpanCorruption(input_length=64)
    ids = stream(tokenizer, docs)
    inputs, targets = examples(ids, tokenizer, settings, seed=5)
    sentinels = sentinel_ids(tokenizer, settings.num_spans)
    expected = corrupt_stream(ids, settings, sentinels, tokenizer.eos_token_id, seed=5)
    assert np.array_equal(inputs, expected[0]) and np.array_equal(targets, expected[1])
    assert tokenizer.convert_ids_to_tokens(int(targets[0, 0])) == "<extra_id_0>"
    assert tokenizer.convert_ids_to_tokens(int(inputs[0, -1])) == "</s>"


def test_a_tokenizer_without_sentinels_is_refused(docs):
    plain = train_tokenizer(docs)
    with pytest.raises(SpanCorruptionError, match="use a T5 or mT5 tokenizer"):
        examples(np.arange(2000), plain)
    with pytest.raises(SpanCorruptionError, match=r"has 0 sentinel tokens .* needs 28 .*use a T5 or mT5 tokenizer"):
        sentinel_ids(plain, SpanCorruption().num_spans)


def test_too_few_sentinels_are_refused(docs):
    few = t5_like_tokenizer(docs, sentinels=10)
    with pytest.raises(
        SpanCorruptionError, match=r"has 10 sentinel tokens .* needs 28 \(first missing: <extra_id_10>\)"
    ):
        sentinel_ids(few, SpanCorruption().num_spans)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(noise_density=0.0), "noise_density must lie strictly between 0 and 1"),
        (dict(noise_density=1.0), "noise_density must lie strictly between 0 and 1"),
        (dict(mean_span_length=0.5), "mean_span_length must be at least 1"),
        (dict(input_length=2), "input_length must be at least 3"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(SpanCorruptionError, match=message):
        SpanCorruption(**kwargs)


def test_an_input_length_no_run_fills_names_the_nearest_ones():
    # half the tokens hidden one by one: runs of 63 and 64 tokens give 63 and 65 input tokens
    with pytest.raises(SpanCorruptionError, match="no run of tokens fills input_length=64 .*use input_length 63 or 65"):
        _ = SpanCorruption(noise_density=0.5, mean_span_length=1.0, input_length=64).raw_length


def test_too_little_text_is_refused(tokenizer):
    settings = SpanCorruption(input_length=64)
    with pytest.raises(SpanCorruptionError, match="fewer than one example needs"):
        corrupt_stream(np.arange(10), settings, sentinel_ids(tokenizer, settings.num_spans), 1, seed=0)
