"""Uptraining's data path without training: the token cache (tokenized once, in parts, one per process), each
process's rows of a step, mixture quotas, stream parts, and resumable DataLoader workers. Processes are simulated
with threads here; tests/uptrain/test_uptrain.py runs the real `accelerate launch` ones."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
import torch

from convert.text import sources as td
from convert.uptrain import batches as updata
from convert.uptrain import mixture, token_cache
from convert.uptrain.loader import StepBatches, make_loader
from convert.uptrain.settings import make_settings
from tests.helpers.uptrain import toy_documents, train_tokenizer, write_corpus


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return toy_documents(300)


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_tokenizer(docs)


def settings(tmp_path, data, **extra):
    values = {"model": "m", "output_dir": str(tmp_path / "out"), "data": data, "max_steps": 4, "block_size": 32}
    values.update(data_cache=str(tmp_path / "cache"), micro_batch_size=2, grad_accum=1, **extra)
    return make_settings(values)


@pytest.fixture
def counted(monkeypatch):
    """Documents tokenized into the cache, per thread (a thread plays a process)."""
    seen: dict[str, int] = {}
    lock = threading.Lock()
    tokenize = token_cache._tokenize

    def counting(batch, tokenizer):
        with lock:
            name = threading.current_thread().name
            seen[name] = seen.get(name, 0) + len(batch["text"])
        return tokenize(batch, tokenizer)

    monkeypatch.setattr(token_cache, "_tokenize", counting)
    return seen


def prepare_as(world: int, s, tokenizer) -> list[dict]:
    """`prepare_data` on `world` simulated processes at once (threads named rank-R)."""

    def one(rank: int) -> dict:
        threading.current_thread().name = f"rank-{rank}"
        return updata.prepare_data(s, tokenizer, rank, world)

    with ThreadPoolExecutor(max_workers=world) as pool:
        return list(pool.map(one, range(world)))


def packed_today(path, tokenizer, fraction: float, block: int) -> torch.Tensor:
    """The blocks the data path packed before the cache: every training document, EOS after each, cut in blocks."""
    texts = td.carve(td.iter_texts(td.load_text_dataset(str(path))), fraction, "train")
    eos = tokenizer.eos_token_id
    return torch.tensor(list(td.pack_blocks(td.tokenize_documents(texts, tokenizer), block, eos)))


@pytest.mark.parametrize("world", [1, 2, 8, 20])  # 20: more processes than held-out documents (15)
def test_each_process_tokenizes_its_part_and_every_process_reads_the_same_blocks(
    world, docs, tokenizer, counted, tmp_path
):
    path = write_corpus(tmp_path / "corpus.txt", docs)
    s = settings(tmp_path, str(path))
    prepared = prepare_as(world, s, tokenizer)
    # the 285 training documents and the 15 held out, each cached in parts: tokenized once in all, 1/N each
    assert sum(counted.values()) == len(docs)
    assert set(counted) == {f"rank-{r}" for r in range(world)}
    assert max(counted.values()) - min(counted.values()) <= 2
    want = packed_today(path, tokenizer, 0.05, 32)
    for data in prepared:
        rows = data["rows"][0]
        assert rows.n == len(want) and torch.equal(rows.take(list(range(rows.n))), want)
        assert data["train_tokens"] == want.numel()
    cache = prepared[0]["sources"][0]["cache"]
    assert cache["hit"] is False and cache["parts"] == world and cache["tokenized_here"][:1] == [0]


def test_a_second_run_hits_the_cache_and_a_changed_input_misses(docs, tokenizer, counted, tmp_path):
    path = write_corpus(tmp_path / "corpus.txt", docs)
    first = updata.prepare_data(settings(tmp_path, str(path)), tokenizer)
    before = sum(counted.values())
    again = updata.prepare_data(settings(tmp_path, str(path), block_size=16), tokenizer)  # blocks cut on reading
    assert sum(counted.values()) == before  # nothing tokenized
    assert (
        again["sources"][0]["cache"]["hit"]
        and again["sources"][0]["cache"]["folder"] == (first["sources"][0]["cache"]["folder"])
    )
    assert torch.equal(again["rows"][0].take([0, 1]).flatten(), first["rows"][0].take([0]).flatten())
    other_tok = train_tokenizer(docs[:100])
    changed = [
        updata.prepare_data(settings(tmp_path, str(path), txt_documents="lines"), tokenizer),
        updata.prepare_data(settings(tmp_path, str(path), validation_fraction=0.1), tokenizer),
        updata.prepare_data(settings(tmp_path, str(path)), other_tok),
    ]
    os.utime(path, ns=(1, 1))  # the file changed (as far as its size and mtime tell)
    changed.append(updata.prepare_data(settings(tmp_path, str(path)), tokenizer))
    folders = {d["sources"][0]["cache"]["folder"] for d in [first, *changed]}
    assert len(folders) == 5 and not any(d["sources"][0]["cache"]["hit"] for d in changed)


def test_n_processes_gather_exactly_the_rows_of_one(docs, tokenizer, tmp_path):
    """Each rank's rows of a step, micro-batch after micro-batch, are the global batch's slices it always took."""
    path = write_corpus(tmp_path / "corpus.txt", docs)
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"body": d.replace("the", "a")}) + "\n" for d in docs[:120]))
    mix = [{"source": str(path), "weight": 0.7}, {"source": str(code), "weight": 0.3, "text_column": "body"}]
    for data_setting in (str(path), mix):
        s = settings(tmp_path, data_setting)
        sources, weights = updata.prepare_data(s, tokenizer)["rows"], None
        weights = mixture.exact_weights([0.7, 0.3] if isinstance(data_setting, list) else [1.0])
        one = StepBatches(sources, weights, 0, micro=2, accum=4, rank=0, procs=1)
        two = [StepBatches(sources, weights, 0, micro=2, accum=2, rank=r, procs=2) for r in (0, 1)]
        for step in (1, 2, 40, 41):  # 40: past the first epoch of the smaller source
            rank0, rank1 = two[0][step], two[1][step]
            interleaved = torch.cat([rank0[:2], rank1[:2], rank0[2:], rank1[2:]])
            assert torch.equal(one[step], interleaved), step
    # one source: the permutation of each epoch seeded by (seed, epoch), as before the cache
    blocks = sources[0].take(list(range(sources[0].n)))
    one = StepBatches(sources[:1], mixture.exact_weights([1.0]), 0, micro=2, accum=4, rank=0, procs=1)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0 * 100_003 + 0))
    assert torch.equal(one[1], blocks[order[:8]])


def test_mixture_quotas_are_exact_and_need_no_history():
    weights = mixture.exact_weights([0.7, 0.2, 0.1])
    assert weights == [Fraction(7, 10), Fraction(1, 5), Fraction(1, 10)]
    previous = [0, 0, 0]
    for j in range(1, 200):
        counts = mixture.cumulative(j, 16, weights)
        assert sum(counts) == 16 * j and all(c >= p for c, p in zip(counts, previous))
        assert all(0 <= 16 * j * float(w) - c < 1 for c, w in zip(counts[1:], weights[1:]))  # floors
        assert 0 <= counts[0] - 16 * j * float(weights[0]) < 2  # the heaviest takes the rest
        assert mixture.batch_counts(j - 1, 16, weights) == [c - p for c, p in zip(counts, previous)]
        previous = counts
    assert mixture.rows_per_source(10, 16, weights) == mixture.cumulative(10, 16, weights)
    assert mixture.quota_problem(16, weights) is None
    assert mixture.quota_problem(2, mixture.exact_weights([0.5, 0.3, 0.2])) is None
    assert "needs at least 2 rows a batch for these weights, got 1" in mixture.quota_problem(
        1, mixture.exact_weights([0.5, 0.3, 0.2])
    )


def test_stream_parts_split_the_documents(docs, tokenizer, tmp_path):
    path = write_corpus(tmp_path / "corpus.txt", docs)
    shards = [tmp_path / f"shard-{i}.jsonl" for i in range(2)]
    for i, shard in enumerate(shards):
        shard.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::2]))

    def read(source, part, parts, holdout=0.0):
        stream = td.PackedStream(
            lambda: td.load_text_dataset(source, streaming=True), tokenizer, 8, 4, 0, holdout, part=part, parts=parts
        )
        return sorted(stream._epoch_documents())

    every_other = [read(str(path), p, 2, 0.05) for p in (0, 1)]  # one file: round robin over documents
    assert sorted(every_other[0] + every_other[1]) == sorted(read(str(path), 0, 1, 0.05))
    assert abs(len(every_other[0]) - len(every_other[1])) <= 1
    by_shard = [read([str(f) for f in shards], p, 2) for p in (0, 1)]  # two files, two parts: a file each
    assert by_shard == [sorted(docs[0::2]), sorted(docs[1::2])]


def test_stream_workers_resume_from_the_states_the_loop_kept(docs, tokenizer, tmp_path):
    """Two DataLoader workers (two parts of the stream); the states kept at step 4 continue the same batches."""
    path = write_corpus(tmp_path / "corpus.txt", docs)
    mix = [{"source": str(path), "weight": 0.75}, {"source": str(path), "weight": 0.25}]
    s = settings(tmp_path, mix, streaming=True, num_workers=2, save_every=4, shuffle_buffer=20)
    data = updata.prepare_data(s, tokenizer)

    def run(start: int, states, steps: int):
        got, kept = {}, dict(states or {})
        loader = make_loader(updata.stream_batches(s, data, 0, 1, start, states), 2, start, start + steps)
        for item, step in zip(loader, range(start + 1, start + steps + 1)):
            assert item["step"] == step and item["part"] == (step - 1) % 2
            got[step] = item["batch"]
            if item["state"] is not None:
                kept[item["part"]] = item["state"]
            if step == 4:
                at_four = dict(kept)
        return got, locals().get("at_four")

    straight, at_four = run(0, None, 8)
    assert sorted(at_four) == [0, 1]
    resumed, _ = run(4, at_four, 4)
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed) and sorted(resumed) == [5, 6, 7, 8]
    assert all(b.shape == (2, 32) for b in straight.values())
