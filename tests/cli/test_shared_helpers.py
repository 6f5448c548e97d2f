"""The helpers shared by the CLI, uptraining and the benches: formatting, figures, scoring a folder."""

from __future__ import annotations

import pytest
import torch

from convert.eval.perplexity import perplexity, score_folder, score_text_file, tokenize_file
from convert.figures import new_figure, save_figure
from convert.formatting import duration, human_bytes, human_count
from tests.helpers.uptrain import tiny_llama, toy_documents, train_tokenizer, write_corpus


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (1_234_567, "1.23 MB"), (5e12, "5.00 TB"), (7e15, "7000.00 TB")],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    "n, unit, text", [(38_400, "", "38.4K"), (999, "", "999"), (2e12, "", "2T"), (4.02e21, "FLOP", "4.02ZFLOP")]
)
def test_human_count(n, unit, text):
    assert human_count(n, unit) == text


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (65.4, "1m05s"), (3599.6, "1h00m00s"), (7384, "2h03m04s")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_save_figure_writes_a_png_with_a_shared_legend(tmp_path):
    fig, axes = new_figure(nrows=1, ncols=2, squeeze=False)
    for ax in axes[0]:
        ax.plot([0, 1], [1, 0], label="a")
    path = save_figure(fig, tmp_path / "f.png", "title", legend_from=axes[0][0], legend_height=0.1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.legends) == 1 and fig.get_suptitle() == "title"


def test_score_folder_is_perplexity_of_the_loaded_model(tmp_path):
    from transformers import AutoModelForCausalLM

    docs = toy_documents(60)
    tokenizer = train_tokenizer(docs)
    folder = tiny_llama(tokenizer, tmp_path / "model")
    text = write_corpus(tmp_path / "text.txt", docs)
    ids = tokenize_file(tokenizer, str(text), 4 * 32 + 1)
    expected = perplexity(AutoModelForCausalLM.from_pretrained(folder), ids, 32, max_windows=4)
    got = score_folder(folder, ids, 32, max_windows=4)
    assert got == expected and got.windows == 4 and got.tokens == 4 * 31
    assert score_text_file(folder, text, 32, 4) == expected
    assert torch.isfinite(torch.tensor(got.ppl))
