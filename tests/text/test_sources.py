"""convert/text/sources.py: text sources, documents, packing, held-out carving, seeded sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert.text import sources as td
from tests.helpers.resources import need
from tests.helpers.uptrain import toy_documents, train_tokenizer, write_corpus

# WikiText's own layout: every line ends with a space before the newline.
WIKI = "".join(
    f"{line} \n"
    for line in (
        "",
        " = First Article =",
        "",
        " Opening paragraph of the first article .",
        "",
        " = = A Section = =",
        "",
        " Text inside the section .",
        "",
        " = Second Article =",
        "",
        " The second article has one paragraph .",
    )
)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return toy_documents(40)


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_tokenizer(docs)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------- documents


def test_wikitext_documents_split_at_titles_and_keep_the_text(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKI)
    assert td.detect_txt_mode(path) == "wikitext"
    docs = list(td.iter_txt_documents([path]))
    assert len(docs) == 2  # the section heading stays inside the first article
    assert docs[0].startswith(" = First Article = \n") and "= = A Section = =" in docs[0]
    assert docs[1].startswith(" = Second Article = ")
    assert "".join(docs) == WIKI[len(" \n") :]  # the documents are the file, minus the blank line before the first


def test_real_wikitext_valid_has_its_60_articles(wikitext_valid):
    docs = list(td.iter_txt_documents([wikitext_valid]))
    assert len(docs) == 60
    assert all(d.lstrip().startswith("= ") and not d.lstrip().startswith("= =") for d in docs)
    text = wikitext_valid.read_text(encoding="utf-8")
    assert "".join(docs) == text[text.index(" = ") :]  # the articles are the file, minus its blank first line


def test_other_txt_modes(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("one a\none b\n\n  \ntwo\n\n\nthree\n")
    assert td.detect_txt_mode(path) == "paragraphs"
    assert list(td.iter_txt_documents([path])) == ["one a\none b", "two", "three"]
    assert list(td.iter_txt_documents([path], "lines")) == ["one a", "one b", "two", "three"]
    assert list(td.iter_txt_documents([path], "file")) == [path.read_text()]
    with pytest.raises(td.DataError, match="txt_documents must be one of"):
        list(td.iter_txt_documents([path], "sentences"))


def test_load_txt_streaming_and_in_memory_agree(tmp_path, docs):
    path = write_corpus(tmp_path / "c.txt", docs)
    in_memory = list(td.iter_texts(td.load_text_dataset(str(path))))
    streamed = list(td.iter_texts(td.load_text_dataset(str(path), streaming=True)))
    assert in_memory == streamed == docs


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_load_column_files_and_rename_the_text_column(tmp_path, docs, kind):
    rows = [{"id": i, "body": d} for i, d in enumerate(docs)]
    path = tmp_path / f"c.{kind}"
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    for streaming in (False, True):
        ds = td.load_text_dataset(str(path), text_column="body", streaming=streaming)
        assert list(td.iter_texts(ds)) == docs
    with pytest.raises(td.DataError, match=r"text column 'text' not found .*columns are: id, body"):
        td.load_text_dataset(str(path))
    with pytest.raises(td.DataError, match=r"text column 'text' not found .*columns are: id, body"):
        td.load_text_dataset(str(path), streaming=True)


def test_globs_lists_and_hub_names(tmp_path, docs):
    write_corpus(tmp_path / "a.txt", docs[:10])
    write_corpus(tmp_path / "b.txt", docs[10:20])
    files = td.local_files(str(tmp_path / "*.txt"))
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    assert list(td.iter_texts(td.load_text_dataset(str(tmp_path / "*.txt")))) == docs[:20]
    listed = td.load_text_dataset([tmp_path / "b.txt", tmp_path / "a.txt"])
    assert list(td.iter_texts(listed)) == docs[10:20] + docs[:10]
    assert td.local_files("wikitext") is None and td.local_files("Salesforce/wikitext") is None


def test_hub_style_dataset_folder_with_splits(tmp_path, docs):
    """A folder laid out like a hub dataset repo resolves through the same `load_dataset(name, split=...)` path."""
    folder = tmp_path / "toy-dataset" / "data"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train-00000-of-00001.jsonl", [{"text": d} for d in docs[:30]])
    write_jsonl(folder / "validation-00000-of-00001.jsonl", [{"text": d} for d in docs[30:]])
    root = str(tmp_path / "toy-dataset")
    assert list(td.iter_texts(td.load_text_dataset(root))) == docs[:30]
    assert list(td.iter_texts(td.load_text_dataset(root, split="validation"))) == docs[30:]
    assert list(td.iter_texts(td.load_text_dataset(root, split="validation", streaming=True))) == docs[30:]
    with pytest.raises(td.DataError, match=r"could not load .*toy-dataset.*\[test\]"):
        td.load_text_dataset(root, split="test")


def test_bad_sources_name_the_problem(tmp_path, docs):
    with pytest.raises(td.DataError, match=r"data file '.*missing\.txt' does not exist"):
        td.load_text_dataset(str(tmp_path / "missing.txt"))
    with pytest.raises(td.DataError, match=r"no file matches"):
        td.load_text_dataset(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(td.DataError, match=r"unsupported type '\.csv'"):
        td.load_text_dataset([tmp_path / "x.csv"])
    write_corpus(tmp_path / "a.txt", docs[:2])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(td.DataError, match="mix kinds"):
        td.load_text_dataset([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(td.DataError, match="holds no text"):
        td.load_text_dataset(str(tmp_path / "empty.txt"))


# ----------------------------------------------------------------------------------------------- tokens


def test_pack_blocks_joins_documents_with_eos_and_drops_the_tail():
    blocks = list(td.pack_blocks([[1, 2, 3], [4], [5, 6, 7, 8, 9]], block_size=4, eos_id=0))
    assert blocks == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]
    assert list(td.pack_blocks([[1, 2]], block_size=4, eos_id=0)) == []  # fewer tokens than one block
    with pytest.raises(td.DataError, match="block_size"):
        list(td.pack_blocks([[1]], block_size=1, eos_id=0))


def test_pack_blocks_long_stream_is_exact():
    docs = [list(range(i, i + 1 + i % 97)) for i in range(3000)]
    flat = [t for d in docs for t in d + [-1]]
    blocks = list(td.pack_blocks(docs, block_size=128, eos_id=-1))
    assert len(blocks) == len(flat) // 128
    assert [t for b in blocks for t in b] == flat[: len(blocks) * 128]


def test_tokenize_and_pack_real_tokenizer(docs, tokenizer):
    eos = td.eos_token_id(tokenizer)
    ids = list(td.tokenize_documents(docs[:3], tokenizer))
    assert ids[0] == tokenizer(docs[0], add_special_tokens=False).input_ids
    assert eos not in ids[0]
    blocks = list(td.pack_blocks(ids, 16, eos))
    assert blocks[0] == (ids[0] + [eos] + ids[1])[:16]
    assert td.count_tokens(docs[:3], tokenizer) == sum(len(i) + 1 for i in ids)


def test_tokenizer_without_eos_is_refused(docs):
    with pytest.raises(td.DataError, match="no EOS token"):
        td.eos_token_id(train_tokenizer(docs, eos=False))


def test_carve_is_exact_disjoint_and_deterministic():
    texts = [f"doc {i}" for i in range(200)]
    held = list(td.carve(texts, 0.05, "validation"))
    train = list(td.carve(texts, 0.05, "train"))
    assert len(held) == 10 and len(train) == 190
    assert set(held).isdisjoint(train) and set(held) | set(train) == set(texts)
    assert held == list(td.carve(iter(texts), 0.05, "validation"))
    assert list(td.carve(texts, 0.0, "validation")) == []
    with pytest.raises(td.DataError):
        list(td.carve(texts, 1.0, "train"))


def test_shuffled_is_a_seeded_permutation():
    items = list(range(1000))
    a, b, c = (list(td.shuffled(items, 100, seed)) for seed in (1, 1, 2))
    assert sorted(a) == items and a == b and a != c and a != items


def test_sample_token_ids(tmp_path, docs, tokenizer):
    path = write_corpus(tmp_path / "c.txt", docs)
    eos = td.eos_token_id(tokenizer)
    ordered = td.sample_token_ids(str(path), tokenizer, 50, seed=None)
    first = tokenizer(docs[0], add_special_tokens=False).input_ids + [eos]
    assert ordered.dtype == torch.long and ordered.shape == (50,)
    assert ordered[: min(50, len(first))].tolist() == first[:50]
    a = td.sample_token_ids(str(path), tokenizer, 300, seed=3)
    b = td.sample_token_ids(str(path), tokenizer, 300, seed=3, streaming=True)
    c = td.sample_token_ids(str(path), tokenizer, 300, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    total = td.count_tokens(docs, tokenizer)
    with pytest.raises(td.DataError, match=f"has only {total} tokens"):
        td.sample_token_ids(str(path), tokenizer, total + 1)


def test_sample_token_ids_real_wikitext(wikitext_valid, smollm2_path):
    from transformers import AutoTokenizer

    need(smollm2_path.is_dir(), "no SmolLM2 folder")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = td.sample_token_ids(str(wikitext_valid), tok, 20_000, seed=0)
    assert ids.shape == (20_000,) and int((ids == tok.eos_token_id).sum()) >= 1  # crosses an article boundary
    first_eos = int((ids == tok.eos_token_id).nonzero()[0])
    head = tok.decode(ids[: min(first_eos, 200)])
    assert head.lstrip().startswith("= ") and head in wikitext_valid.read_text(encoding="utf-8")  # an article's start


def test_packed_stream_resumes_from_its_state(tmp_path, docs, tokenizer):
    """Blocks after a JSON round trip of the state equal the blocks of the stream that went on, across epochs."""
    path = write_corpus(tmp_path / "c.txt", docs)

    def open_dataset():
        return td.load_text_dataset(str(path), streaming=True)

    def stream(state=None):
        return td.PackedStream(open_dataset, tokenizer, 64, buffer_size=7, seed=5, holdout=0.1, state=state)

    per_epoch = td.count_tokens(td.carve(docs, 0.1, "train"), tokenizer) // 64
    reference = stream().blocks()
    expected = [next(reference) for _ in range(3 * per_epoch)]  # three epochs
    for cut in (0, 5, per_epoch - 1, per_epoch + 3):
        first = stream()
        blocks = first.blocks()
        taken = [next(blocks) for _ in range(cut)]
        state = json.loads(json.dumps(first.state()))
        resumed = stream(state).blocks()
        assert taken + [next(resumed) for _ in range(len(expected) - cut)] == expected, cut

    eos = td.eos_token_id(tokenizer)
    flat = [t for b in expected[:per_epoch] for t in b]
    held = set(td.carve(docs, 0.1, "validation"))
    assert flat.count(eos) >= len(docs) - len(held) - 8  # every kept document ends with EOS (buffer tail aside)
    text = tokenizer.decode([t for t in flat if t != eos])
    assert not any(h in text for h in held)  # held-out documents never reach training
    assert expected[:per_epoch] != expected[per_epoch : 2 * per_epoch]  # each epoch reshuffles


def test_packed_stream_refuses_an_empty_stream(tmp_path, tokenizer):
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    s = td.PackedStream(lambda: td.load_text_dataset(str(tmp_path / "e.jsonl"), streaming=True), tokenizer, 8, 4, 0)
    with pytest.raises(td.DataError, match="no training documents"):
        next(s.blocks())
