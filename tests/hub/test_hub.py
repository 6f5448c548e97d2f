"""The hub path against a local hub (tests/helpers/hub_server.py) that huggingface_hub talks to as it talks to the real
one: inspect and --dry-run read config.json and the shard headers only (no weight byte is sent), a conversion
records the commit its revision resolved to and carries the licence files, the card is huggingface_hub's, and
--push-to-hub / push_to_hub: upload the output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from convert.cli import main
from convert.hub import LEGAL_FILES, hub_origin
from convert.hub.card import source_license
from tests.helpers.hub_server import TOKEN, FakeHub, header_end
from tests.helpers.tiny import save, tiny_model

REPO = Path(__file__).resolve().parents[2]
CARD = b"---\nlicense: llama2\ntags:\n- text-generation\n---\n# The source's own card\n"
LEGAL = {"LICENSE.txt": b"the licence\n", "NOTICE": b"notice\n", "USE_POLICY.md": b"use policy\n"}
OTHER = {"tokenizer.json": b"{}" * 20000, "notes.txt": b"not a legal file\n", "README.md": CARD}


def point_huggingface_hub_at(monkeypatch, hub: FakeHub, tmp_path: Path) -> None:
    """What HF_ENDPOINT does at import, for this process: every URL, the cache and the token file are the test's."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", hub.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)  # the local hub speaks git LFS, not Xet (hf_xet may be there)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(lifetime=240) as server:
        point_huggingface_hub_at(monkeypatch, server, tmp_path)
        yield server


def publish_source(hub: FakeHub, tmp_path: Path, kind: str = "llama") -> tuple[Path, str]:
    """A sharded tiny checkpoint with a tokenizer-sized file, a card and licence files, as `org/tiny-KIND`; its
    commit is also the ref `release`."""
    src = save(tiny_model(kind), tmp_path / f"src-{kind}", shard="20KB")
    sha = hub.add_repo(f"org/tiny-{kind}", src, {**LEGAL, **OTHER})
    hub.repos[f"org/tiny-{kind}"].refs["release"] = sha
    return src, sha


def run_cli(*args: str) -> tuple[int, str]:
    """Exit code and stdout (stderr when it failed)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


# ------------------------------------------------------------------------------------------- no weights read


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])  # gpt_neox: read as phi (the stock route), also remotely
def test_inspect_and_dry_run_send_no_weight_bytes(hub, tmp_path, kind):
    src, sha = publish_source(hub, tmp_path, kind)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 3
    code, out = run_cli("inspect", f"org/tiny-{kind}", "--json")
    assert code == 0, out
    info = json.loads(out)
    assert info["commit"] == sha and info["num_heads"] == 8
    assert info == json.loads(run_cli("inspect", str(src), "--json")[1]) | {"source": f"org/tiny-{kind}", "commit": sha}
    assert hub.weight_bytes_sent == 0
    # Exactly the header of each shard (two ranged reads), config.json and the index: no tokenizer, no card
    headers = {n: header_end((src / n).read_bytes()) for n in shards}
    assert dict(hub.sent) == {"config.json": (src / "config.json").stat().st_size,
                              "model.safetensors.index.json": (src / "model.safetensors.index.json").stat().st_size,
                              **headers}  # fmt: skip
    hub.reset_counts()
    code, out = run_cli(
        "convert", f"org/tiny-{kind}", str(tmp_path / "out"), "-g", "2", "--dry-run", "--json", "--revision", "release"
    )
    assert code == 0, out
    report = json.loads(out)
    assert report["dry_run"] and report["source_commit"] == sha and report["kv_heads_after"] == 2
    assert hub.weight_bytes_sent == 0 and set(hub.sent) <= set(headers) and not (tmp_path / "out").exists()


def test_a_missing_repository_or_revision_is_one_error_line(hub, tmp_path):
    publish_source(hub, tmp_path)
    code, out = run_cli("inspect", "org/absent")
    assert code == 2 and out.startswith("error: could not fetch org/absent from the hub") and "check the id" in out
    code, out = run_cli("inspect", "org/tiny-llama", "--revision", "no-such-branch")
    assert code == 2 and "check --revision" in out


def test_a_shard_missing_or_unreadable_on_the_hub_is_one_error_line(hub, tmp_path):
    src, _ = publish_source(hub, tmp_path)
    shard = sorted(p.name for p in src.glob("*.safetensors"))[3]
    hub.broken.add(shard)
    code, out = run_cli("inspect", "org/tiny-llama")
    assert code == 2 and out.startswith(f"error: could not fetch org/tiny-llama/{shard} from the hub (")
    assert "500" in out and len(out.strip().splitlines()) == 1
    del hub.repos["org/tiny-llama"].files[shard]
    code, out = run_cli("inspect", "org/tiny-llama")
    assert code == 2 and f"names shard(s) that do not exist: {shard}" in out


# ------------------------------------------------------------------------------------------- a real conversion


def test_convert_from_the_hub_records_the_commit_and_carries_the_licence(hub, tmp_path):
    from huggingface_hub import ModelCard

    src, sha = publish_source(hub, tmp_path)
    out = tmp_path / "out"
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    enable_progress_bars()  # another test's `datasets` call may have switched them off for the whole process
    result = CliRunner().invoke(main, ["convert", "org/tiny-llama", str(out), "-g", "2", "-q", "--revision", "release"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and not are_progress_bars_disabled()  # -q: no download bars, and they are back after
    assert hub.weight_bytes_sent == sum(
        p.stat().st_size - header_end(p.read_bytes()) for p in src.glob("*.safetensors")
    )
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 2
    files = {p.name for p in out.iterdir()}
    assert set(LEGAL) <= files and "notes.txt" not in files and "tokenizer.json" in files
    assert all((out / name).read_bytes() == data for name, data in LEGAL.items())
    provenance = json.loads((out / "gqa_convert.json").read_text())
    assert provenance["source_commit"] == sha and provenance["settings"]["revision"] == "release"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-llama" and card.data.license == "llama2"
    assert "gqa-convert" in card.data.tags and f"at commit [`{sha}`]" in card.text
    assert "The source's own card" not in card.text


def test_legal_file_patterns_match_the_spellings_repositories_use():
    from fnmatch import fnmatchcase

    for name in ["LICENSE", "LICENSE.txt", "license.md", "LICENCE", "License-MIT", "NOTICE", "Notice.txt",
                 "USE_POLICY.md", "use_policy.txt", "COPYING"]:  # fmt: skip
        assert any(fnmatchcase(name, p) for p in LEGAL_FILES), name
    for name in ["README.md", "config.json", "notes.txt", "sub/LICENSE"]:
        assert not any(fnmatchcase(name, p) for p in LEGAL_FILES), name


def test_licence_from_the_card_then_the_config(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-licence\nlicense_link: LICENSE\n---\ntext\n"
    )
    assert source_license(tmp_path, {"license": "mit"}) == {
        "license": "other",
        "license_name": "tiny-licence",
        "license_link": "LICENSE",
    }
    (tmp_path / "README.md").write_text("no front matter\n")
    assert source_license(tmp_path, {"license": "apache-2.0"}) == {"license": "apache-2.0"}
    assert source_license(tmp_path, {}) == {}


def test_a_hub_cache_snapshot_folder_keeps_its_hub_id_and_commit(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    assert hub_origin(snapshot) == ("org/name", "b" * 40)
    assert hub_origin(tmp_path) is None


# ------------------------------------------------------------------------------------------- publishing


def test_push_to_hub_uploads_the_output_privately(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    src = save(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    code, text = run_cli("convert", str(src), str(out), "-g", "1", "--json", "--push-to-hub", "me/tiny-mqa")
    assert code == 0, text
    report = json.loads(text)
    repo = hub.repos["me/tiny-mqa"]
    assert repo.private and report["pushed"] == f"{hub.url}/me/tiny-mqa/commit/{repo.refs['main']}"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        k: v for k, v in repo.files.items() if k != ".gitattributes"
    }
    oid = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert ("PUT", f"/lfs-upload/{oid}") in hub.requests  # the weights went by LFS, as on the hub
    # Into the same repository again, public asked: the existing repository keeps its visibility
    code, text = run_cli("convert", str(src), str(tmp_path / "out2"), "-g", "2", "-q", "--push-to-hub", "me/tiny-mqa")
    assert code == 0 and "uploaded to" in text and repo.private
    assert json.loads(repo.files["config.json"])["num_key_value_heads"] == 2
    code, text = run_cli(
        "convert", str(src), str(tmp_path / "out3"), "-g", "2", "-q", "--push-to-hub", "me/open", "--public"
    )
    assert code == 0 and not hub.repos["me/open"].private
    code, text = run_cli("convert", str(src), str(tmp_path / "o4"), "-g", "2", "--dry-run", "--push-to-hub", "me/dry")
    assert code == 0 and "would upload to me/dry" in text and "me/dry" not in hub.repos


def test_push_without_a_token_refuses_before_converting(hub, tmp_path, monkeypatch):
    src = save(tiny_model("llama"), tmp_path / "src")
    code, out = run_cli("convert", str(src), str(tmp_path / "out"), "-g", "1", "--push-to-hub", "me/x")
    assert code == 2 and out.startswith("error: push to hub me/x: no hub token") and "HF_TOKEN" in out
    assert not (tmp_path / "out").exists() and "me/x" not in hub.repos
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, out = run_cli("convert", str(src), str(tmp_path / "out"), "-g", "1", "--push-to-hub", "me/x")
    assert code == 2 and "did not accept the token" in out and not (tmp_path / "out").exists()


def test_a_failed_upload_keeps_the_output_and_says_how_to_retry(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.refuse_commits = True
    src = save(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    code, text = run_cli("convert", str(src), str(out), "-g", "1", "-q", "--push-to-hub", "me/tiny")
    assert code == 2 and text.startswith(f"error: could not upload {out} to the hub repository me/tiny")
    assert f"kept in {out}" in text and f"hf upload me/tiny {out}" in text
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1


@pytest.mark.slow
def test_through_hf_endpoint_in_a_fresh_process(tmp_path):
    """The user's way: HF_ENDPOINT and HF_TOKEN in the environment of the real console script."""
    with FakeHub(lifetime=240) as hub:
        src, sha = publish_source(hub, tmp_path)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
        env.update(HF_HUB_DISABLE_XET="1")
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_HUB_CACHE", None)
        env.pop("HF_TOKEN", None)
        cli = [sys.executable, "-m", "convert.cli"]
        done = subprocess.run([*cli, "inspect", "org/tiny-llama"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and f"commit {sha}" in done.stdout, done.stderr
        assert hub.weight_bytes_sent == 0
        env["HF_TOKEN"] = TOKEN
        out = tmp_path / "out"
        command = [*cli, "convert", "org/tiny-llama", str(out), "-g", "1", "-q", "--push-to-hub", "org/tiny-mqa"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert hub.repos["org/tiny-mqa"].files["model.safetensors"] == (out / "model.safetensors").read_bytes()
        assert hub.repos["org/tiny-mqa"].files["LICENSE.txt"] == LEGAL["LICENSE.txt"]


@pytest.mark.slow  # trains a tiny model for two steps
def test_uptraining_pushes_model_and_a_rerun_retries_a_failed_upload(hub, tmp_path, monkeypatch, capsys):
    from convert.uptrain.loop import main as uptrain_main
    from tests.helpers.uptrain import tiny_llama, toy_documents, train_tokenizer, write_corpus

    docs = toy_documents(60)
    model = tiny_llama(train_tokenizer(docs), tmp_path / "model-mqa")
    (model / "LICENSE").write_text("the source's licence\n")
    out = tmp_path / "run"
    args = [f"model={model}", f"data={write_corpus(tmp_path / 'corpus.txt', docs)}", f"output_dir={out}"]
    args += ["max_steps=2", "block_size=32", "micro_batch_size=2", "max_eval_blocks=2", "eval_every=0"]
    args += ["save_every=0", "report_to=none", "resume=auto", "push_to_hub=me/uptrained", "--quiet", "--json"]
    assert uptrain_main(args) == 2  # no token: refused before any compute
    assert "error: push_to_hub: push to hub me/uptrained: no hub token" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.refuse_commits = True
    assert uptrain_main(args) == 1  # trained and saved; the upload failed
    err = capsys.readouterr().err
    assert f"error: could not upload {out / 'model'} to the hub repository me/uptrained" in err
    assert (out / "model" / "training_summary.json").is_file()
    hub.refuse_commits = False
    assert uptrain_main(args) == 0  # complete: nothing trained, only uploaded
    summary = json.loads(capsys.readouterr().out)
    repo = hub.repos["me/uptrained"]
    assert repo.private and summary["pushed"].endswith(f"/me/uptrained/commit/{repo.refs['main']}")
    files = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    assert files == {k: v for k, v in repo.files.items() if k != ".gitattributes"} and "LICENSE" in files
