"""T5's span-corruption objective as pure, seeded functions on token ids (numpy; no torch, no model).

A run of `raw_length` tokens is split into alternating kept and noise spans; each noise span is replaced in the
inputs by the next sentinel, and the targets list every sentinel followed by the tokens it hides:

    tokens    a b c d e f g h i j                    (raw_length = 10)
    mask      . . x x . . . x . .                    noise density 0.3, mean span length 1.5
    inputs    a b <s0> e f g <s1> i j </s>           input_length = kept + spans + 1
    targets   <s0> c d <s1> h </s>                   target_length = noise + spans + 1

The counts of noise tokens and spans depend on `raw_length` alone, so every example has exactly the same input and
target lengths; `raw_length` is the longest run whose inputs fill `input_length`, so nothing is padded (settings
where no run fills it exactly are refused with the nearest lengths that work). Where the
spans fall is drawn from (seed, example index): the same seed gives the same masks whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from convert.errors import SpanCorruptionError

SENTINEL = "<extra_id_{}>"  # T5 and mT5 name their sentinels so; <extra_id_0> comes first


@dataclass(frozen=True)
class SpanCorruption:
    """The three settings of the objective; the lengths follow from them."""

    noise_density: float = 0.15  # share of tokens hidden
    mean_span_length: float = 3.0  # mean length of a hidden span
    input_length: int = 512  # tokens per encoder input, </s> included

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise SpanCorruptionError(f"noise_density must lie strictly between 0 and 1, got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise SpanCorruptionError(f"mean_span_length must be at least 1, got {self.mean_span_length}")
        if self.input_length < 3:
            raise SpanCorruptionError(
                f"input_length must be at least 3 (a token, a sentinel, </s>), got {self.input_length}"
            )

    def counts(self, raw_length: int) -> tuple[int, int]:
        """(noise tokens, noise spans) of a run of raw_length tokens, at least one of each and one kept token."""
        noise = min(max(round(raw_length * self.noise_density), 1), raw_length - 1)
        spans = max(min(round(noise / self.mean_span_length), noise, raw_length - noise), 1)
        return noise, spans

    def lengths(self, raw_length: int) -> tuple[int, int]:
        """(input length, target length) of a run of raw_length tokens, each with its closing </s>."""
        noise, spans = self.counts(raw_length)
        return raw_length - noise + spans + 1, noise + spans + 1

    @cached_property
    def raw_length(self) -> int:
        """The longest run whose inputs fit input_length. Adding a token adds 0 or 1 input tokens unless the
        spans are clamped to the kept tokens, so its inputs fill input_length exactly."""
        n = 2
        while self.lengths(n + 1)[0] <= self.input_length:
            n += 1
        if self.lengths(n)[0] != self.input_length:  # spans clamped to the kept tokens: high density, short spans
            near = sorted({self.lengths(n)[0], self.lengths(n + 1)[0]})
            raise SpanCorruptionError(
                f"no run of tokens fills input_length={self.input_length} with noise_density={self.noise_density} "
                f"and mean_span_length={self.mean_span_length}: use input_length {' or '.join(map(str, near))}"
            )
        return n

    @property
    def target_length(self) -> int:
        return self.lengths(self.raw_length)[1]

    @property
    def num_spans(self) -> int:
        """Noise spans per example: the sentinels each example needs."""
        return self.counts(self.raw_length)[1]


def _segment_lengths(total: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of `total` items into `segments` non-empty runs: [segments] lengths."""
    cuts = np.sort(rng.choice(total - 1, segments - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(raw_length: int, settings: SpanCorruption, rng: np.random.Generator) -> np.ndarray:
    """[raw_length] bool, True where a token is hidden; kept and noise spans alternate, kept first."""
    noise, spans = settings.counts(raw_length)
    noise_runs = _segment_lengths(noise, spans, rng)
    kept_runs = _segment_lengths(raw_length - noise, spans, rng)
    runs = np.stack([kept_runs, noise_runs], axis=1).reshape(-1)  # kept0 noise0 kept1 noise1 ...
    flags = np.tile([False, True], spans)
    return np.repeat(flags, runs)


def _replace_spans(tokens: np.ndarray, hidden: np.ndarray, sentinels: np.ndarray, eos: int) -> np.ndarray:
    """Drop the tokens where `hidden` is True, each run of them replaced by the next sentinel; then </s>."""
    starts = hidden & ~np.concatenate([[False], hidden[:-1]])  # first token of each hidden run
    out = np.where(starts, 0, tokens)
    out[starts] = sentinels[: int(starts.sum())]
    keep = ~hidden | starts
    return np.concatenate([out[keep], [eos]])


def corrupt(
    tokens: np.ndarray, settings: SpanCorruption, sentinels: np.ndarray, eos: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One run of settings.raw_length tokens -> (inputs [input_length], targets [target_length])."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.shape != (settings.raw_length,):
        raise SpanCorruptionError(f"expected {settings.raw_length} tokens, got shape {tokens.shape}")
    hidden = noise_mask(settings.raw_length, settings, rng)
    return _replace_spans(tokens, hidden, sentinels, eos), _replace_spans(tokens, ~hidden, sentinels, eos)


def corrupt_stream(
    ids: np.ndarray, settings: SpanCorruption, sentinels: np.ndarray, eos: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A token stream (documents joined) packed into runs of raw_length and corrupted; a partial last run is
    dropped. Example i draws its spans from (seed, i). Returns inputs [N, input_length], targets [N, target_length].
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids) // settings.raw_length
    if n == 0:
        raise SpanCorruptionError(
            f"{len(ids)} tokens are fewer than one example needs ({settings.raw_length}): give more text or a "
            "smaller input_length"
        )
    runs = ids[: n * settings.raw_length].reshape(n, settings.raw_length)
    pairs = [corrupt(run, settings, sentinels, eos, np.random.default_rng([seed, i])) for i, run in enumerate(runs)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: np.ndarray, eos: int) -> np.ndarray:
    """The original run from one example: each sentinel in the inputs replaced by what follows it in the targets."""
    sentinel_set = {int(s) for s in sentinels}
    hidden: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist():
        if t == eos:
            break
        if t in sentinel_set:
            current = hidden.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in inputs.tolist():
        if t == eos:
            break
        out.extend(hidden.get(t, []) if t in sentinel_set else [t])
    return np.asarray(out, dtype=np.int64)


def sentinel_ids(tokenizer: Any, needed: int) -> np.ndarray:
    """The ids of <extra_id_0> ... <extra_id_{needed-1}> in the tokenizer, in that order; refuses a tokenizer that
    lacks them (a llama or GPT-2 tokenizer maps them to the unknown token or splits them into pieces)."""
    names = [SENTINEL.format(i) for i in range(needed)]
    vocab = tokenizer.get_vocab()
    missing = [n for n in names if n not in vocab]
    if missing:
        have = sum(SENTINEL.format(i) in vocab for i in range(1000))
        raise SpanCorruptionError(
            f"the tokenizer has {have} sentinel tokens (<extra_id_N>) but span corruption needs {needed} "
            f"(first missing: {missing[0]}): use a T5 or mT5 tokenizer, or lower input_length or noise_density"
        )
    ids = np.asarray([vocab[n] for n in names], dtype=np.int64)
    if tokenizer.eos_token_id is None or len(set(ids.tolist())) != needed:
        raise SpanCorruptionError("the tokenizer needs an eos token and distinct sentinel ids for span corruption")
    return ids


def examples(
    ids: np.ndarray, tokenizer: Any, settings: SpanCorruption | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`corrupt_stream` with the sentinels and </s> read from the tokenizer (refused clearly where it lacks them):
    inputs [N, input_length] for `input_ids`, targets [N, target_length] for `labels`."""
    settings = settings or SpanCorruption()
    sentinels = sentinel_ids(tokenizer, settings.num_spans)
    return corrupt_stream(ids, settings, sentinels, int(tokenizer.eos_token_id), seed)
