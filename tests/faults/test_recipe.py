"""The uptraining recipe under faults: SIGKILL at seeded write events, a full disk, through the real launcher.

Every run is a real `accelerate launch` (or `python recipes/uptrain.py`) subprocess on a 2-layer, 64-wide llama.
Kills come from tests/helpers/fault_inject.py, a test-only wrapper around the unchanged recipe; see docs/dev/faults.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.uptrain import REPO, ok, recipe_env, tiny_llama, toy_documents, train_tokenizer, write_corpus

RECIPE = REPO / "recipes" / "uptrain.py"
INJECT = REPO / "tests" / "helpers" / "fault_inject.py"
# 9 steps, a checkpoint every 3 (the third prunes the first), evaluations at 4 and 8, then the final model.
RUN = [
    "block_size=32",
    "micro_batch_size=4",
    "grad_accum=1",
    "lr=3e-3",
    "warmup_steps=2",
    "seed=0",
    "max_eval_blocks=8",
    "report_to=none",
    "eval_every=4",
    "save_every=3",
    "keep_checkpoints=2",
    "max_steps=9",
    "--quiet",
]
KILL_SEED = 13
KILLS = {"checkpoint": 4, "final": 3, "training": 3}  # kill points drawn from each part of the run
HOWS = {"replace": ("before", "after"), "rename": ("before", "after")}  # other ops: before, partial, after


def launch(args: list[str], spec: dict | None = None, preexec_fn=None, accelerate: bool = True):
    """`accelerate launch` of the recipe, one process, through the fault wrapper when `spec` is given.

    `accelerate=False` runs `python` directly, where the recipe's own stderr is all there is (accelerate's launcher
    adds its traceback of the child's non-zero exit).
    """
    script = [str(RECIPE)]
    if spec is not None:
        spec_file = Path(spec["root"]).parent / f"spec-{os.getpid()}-{random.random()}.json"
        spec_file.write_text(json.dumps(spec))
        script = [str(INJECT), str(spec_file), str(RECIPE)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*(command if accelerate else [sys.executable]), *script, *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=recipe_env(), cwd=REPO, timeout=600, preexec_fn=preexec_fn
    )


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len({r["step"] for r in train}) == len(train), "a step was logged twice"
    return {r["step"]: r["loss"] for r in train}


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def readable(path: Path) -> None:
    """Load a checkpoint or model file whole: a truncated file raises."""
    if path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix in (".bin", ".pkl"):
        torch.load(path, weights_only=False)
    elif path.suffix == ".json":
        json.loads(path.read_text())


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fault-assets")
    docs = toy_documents(200)
    tok = train_tokenizer(docs)
    return {"corpus": write_corpus(root / "corpus.txt", docs), "model": tiny_llama(tok, root / "model")}


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> dict:
    """The uninterrupted run, traced: its per-step losses, files, and every write event in order."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trace = out.parent / "trace.jsonl"
    ok(
        launch(
            [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={out}", *RUN],
            {"root": str(out), "trace": str(trace)},
        )
    )
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    checkpoint_files = sorted(p.name for p in (out / "checkpoints" / "step-000009").iterdir())
    return {"out": out, "losses": losses(out), "events": events, "checkpoint_files": checkpoint_files}


def kill_points(events: list[dict]) -> list[dict]:
    """KILLS seeded random write events from the checkpoint writes, the final output and the training steps."""

    def part(event: dict) -> str:
        if event["path"].startswith("checkpoints"):
            return "checkpoint"
        if event["path"].startswith((".tmp-model", "model", "loss.png")):
            return "final"
        return "training"

    rng = random.Random(KILL_SEED)
    points = []
    for name, count in KILLS.items():
        for event in rng.sample([e for e in events if part(e) == name], count):
            points.append({**event, "how": rng.choice(HOWS.get(event["op"], ("before", "partial", "after")))})
    return points


def check_after_kill(out: Path, ref: dict) -> None:
    """What a kill may leave: no half checkpoint that resume could pick, no half model/, only .tmp- debris."""
    for ckpt in (out / "checkpoints").glob("step-*"):
        if (ckpt / "trainer_state.json").is_file():  # what resume: auto would pick
            assert sorted(p.name for p in ckpt.iterdir()) == ref["checkpoint_files"], ckpt
            for f in ckpt.iterdir():
                readable(f)
    model = out / "model"
    if model.exists():
        assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in (ref["out"] / "model").iterdir())
        got, want = (
            load_file(str(model / "model.safetensors")),
            load_file(str(ref["out"] / "model" / "model.safetensors")),
        )
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def kill_and_resume(assets, ref: dict, point: dict, out: Path) -> dict:
    before = digest(assets["model"])
    args = [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={out}", *RUN]
    kill = {k: point[k] for k in ("op", "path", "nth", "how")}
    killed = launch(args, {"root": str(out), "kill": kill})
    state = {"killed": killed, "files": sorted(str(p.relative_to(out)) for p in out.rglob("*"))}
    state["check"] = None
    try:
        check_after_kill(out, ref)
    except AssertionError as e:
        state["check"] = e
    state["resumed"] = launch([*args, "resume=auto"], accelerate=False)
    state["source_unchanged"] = digest(assets["model"]) == before
    return state


@pytest.mark.slow
def test_sigkill_at_seeded_write_events_then_resume(assets, reference, tmp_path):
    points = kill_points(reference["events"])
    assert len(points) == sum(KILLS.values())
    assert any(p["path"].startswith("checkpoints/.tmp-step") for p in points)  # inside a checkpoint write
    assert any(p["path"].startswith(".tmp-model") for p in points)  # inside the final model write
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(kill_and_resume, assets, reference, p, tmp_path / f"kill-{i}") for i, p in enumerate(points)
        ]
        states = [f.result(timeout=900) for f in futures]
    failures = []
    for i, (point, state) in enumerate(zip(points, states)):
        try:
            check_kill_and_resume(tmp_path / f"kill-{i}", point, state, reference)
        except AssertionError as e:
            failures.append(f"kill {i} at {point}: {e}; the kill left {state['files']}")
    assert not failures, "\n".join(failures)


def check_kill_and_resume(out: Path, point: dict, state: dict, reference: dict) -> None:
    killed = state["killed"]
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-2000:]  # accelerate names the signal
    assert state["check"] is None, state["check"]
    assert state["source_unchanged"]
    ok(state["resumed"])
    assert losses(out) == reference["losses"]  # every step, bit for bit
    assert not list(out.glob(".tmp*")) and not list((out / "checkpoints").glob(".tmp*"))
    # a kill between saving step 9 and pruning step 3 leaves 3 checkpoints: more than kept, never fewer
    assert {"step-000006", "step-000009"} <= {p.name for p in (out / "checkpoints").iterdir()}
    check_after_kill(out, reference)
    assert (out / "model" / "training_summary.json").is_file()


# ------------------------------------------------------------------------------------------------ a full disk


def file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def no_final_debris(out: Path) -> None:
    assert not (out / "model").exists()
    assert not list(out.glob(".tmp*")) and not list((out / "checkpoints").glob(".tmp*"))


@pytest.mark.slow
def test_a_file_size_limit_fails_the_checkpoint_cleanly_then_the_run_completes(assets, reference, tmp_path):
    out = tmp_path / "run"
    args = [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={out}", *RUN]
    full = launch(args, preexec_fn=file_size_limit(200_000), accelerate=False)  # no room for the 375 KB weights
    assert full.returncode == 1
    assert "error: cannot write checkpoint step-000003" in full.stderr and "File too large" in full.stderr
    assert "the newest complete checkpoint is none. Free space" in full.stderr and "resume: auto" in full.stderr
    assert "Traceback" not in full.stderr
    assert not list((out / "checkpoints").iterdir())  # the half-written .tmp-step-000003 is gone too
    no_final_debris(out)
    ok(launch([*args, "resume=auto"]))  # the limit lifted
    assert losses(out) == reference["losses"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "event, resumed_from",
    [
        ({"op": "torch.save", "path": "checkpoints/.tmp-step-000006/optimizer.bin", "nth": 0}, "step-000003"),
        ({"op": "save_file", "path": ".tmp-model/model.safetensors", "nth": 0}, "step-000009"),
    ],
    ids=["checkpoint", "final-model"],
)
def test_enospc_fails_cleanly_then_resume_reproduces_the_run(assets, reference, tmp_path, event, resumed_from):
    out = tmp_path / "run"
    args = [f"model={assets['model']}", f"data={assets['corpus']}", f"output_dir={out}", *RUN]
    full = launch(args, {"root": str(out), "kill": {**event, "how": "enospc"}}, accelerate=False)
    assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr[-3000:]
    what = "checkpoint step-000006" if event["op"] == "torch.save" else "the final model"
    assert f"error: cannot write {what} in {out}" in full.stderr and "Traceback" not in full.stderr
    no_final_debris(out)
    assert resumed_from in [p.name for p in (out / "checkpoints").iterdir()]
    ok(launch([*args, "resume=auto"]))
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith(resumed_from)
    assert losses(out) == reference["losses"]
