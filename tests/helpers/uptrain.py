"""Tiny, self-contained assets for the data and uptraining tests: a corpus, a BPE tokenizer, llama checkpoints;
and the process helpers the uptraining tests share (environment, launches, kills, scenario pools).

Everything is built offline in well under a second: a seeded toy corpus with real structure (so a model can learn
it), a byte-level BPE tokenizer trained on it with `tokenizers`, and llama models built from configs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour"]
VERBS = ["sat on", "looked at", "walked to", "found", "liked", "painted", "waited near"]
OBJECTS = ["the mat", "a red house", "the river", "an apple", "the garden", "a blue car", "the station"]


def toy_documents(n: int = 300, seed: int = 0) -> list[str]:
    """`n` documents of 3-12 short sentences from a tiny grammar."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(rng.randint(3, 12))
        ]
        docs.append(" ".join(sentences))
    return docs


def write_corpus(path: Path, docs: list[str]) -> Path:
    """Documents as a plain-text file, separated by blank lines (the `paragraphs` layout)."""
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def train_tokenizer(docs: list[str], eos: bool = True):
    """A byte-level BPE tokenizer (about 400 tokens) wrapped for transformers, EOS `<eos>` unless `eos=False`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    if eos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def tiny_llama(
    tokenizer, folder: Path, num_kv_heads: int = 1, seed: int = 0, hidden: int = 64, init_range: float = 0.02
) -> Path:
    """A 2-layer llama with tied embeddings, saved with its tokenizer (a complete checkpoint folder).

    A larger `init_range` gives peaked predictions whose heads differ, which a teacher needs to be worth imitating.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=init_range,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def mean_pool_kv(source: Path, folder: Path, tokenizer) -> Path:
    """A multi-query copy of `source`: K/V heads averaged into one (the paper's mean-pool conversion)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    config = model.config
    groups, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    config.num_key_value_heads = 1
    mqa = type(model)(config)
    state = model.state_dict()
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(groups, head_dim, -1).mean(0)
    mqa.load_state_dict(state)
    mqa.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def t5_tokenizer(docs: list[str], sentinels: int = 100):
    """A BPE tokenizer with T5's specials: <pad> 0 (the decoder start), </s> 1, <unk>, then <extra_id_0..N-1>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(sentinels)]
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_t5(tokenizer, folder: Path, seed: int = 0, d_model: int = 32, init_factor: float = 1.0) -> Path:
    """A 2+2-layer T5.1.1 (gated-gelu, untied head, 4 heads), saved with its tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_factor=init_factor,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hooked_command(args: list[str], hooks: str) -> list[str]:
    """The uptraining command line with test hooks, as a fresh process (for kills and faults).

    `hooks` is the source of `Hooks(...)`'s arguments, e.g. `"after_step=lambda step: time.sleep(0.3)"` (slow
    steps, so that a kill lands mid-run) or `"on_loss=lambda step, loss: loss * float('nan') if step == 5 else loss"`.
    The library reads no environment variable for these: only tests can switch them on.
    """
    code = f"import sys, time\nfrom convert.uptrain import Hooks, main\nsys.exit(main(sys.argv[1:], Hooks({hooks})))"
    return [sys.executable, "-c", code, *args]


def recipe_env(**extra: str) -> dict:
    """This environment without a parent launch's accelerate variables, offline, one thread, this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launch(config: Path, *program: str) -> list[str]:
    """`accelerate launch` of `program` (a script or `-m module`, with its arguments) as 2 processes."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return [*launch, "--num_processes", "2", "--main_process_port", str(free_port()), *program]


def logged_steps(out: Path) -> int:
    """The last step in a metrics file being written (a half-written last line is skipped)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def kill_after_checkpoint(command: list[str], out: Path, step: int = 6, logged: int = 8) -> dict:
    """Run the uptraining `command` with slowed steps, SIGKILL it once the step-`step` checkpoint exists and `logged`
    steps are in its metrics; what was left: exit code, checkpoint, final model, steps logged, the log's tail."""
    out.mkdir(parents=True)
    log_path = out.parent / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            hooked_command(command, "after_step=lambda step: time.sleep(0.3)"),  # slow steps: the kill lands mid-run
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=recipe_env(),
        )
        checkpoint = out / "checkpoints" / f"step-{step:06d}" / "trainer_state.json"
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if checkpoint.is_file() and logged_steps(out) >= logged:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        return {
            "returncode": proc.wait(60),
            "checkpoint": checkpoint.is_file(),
            "model": (out / "model").exists(),
            "logged": logged_steps(out),
            "log": log_path.read_text()[-3000:],
        }


def start_scenarios(scenarios: dict, assets: dict, root: Path):
    """Start every scenario(assets, output folder) at once, 3 at a time; yields `runs`, where `runs[name]` waits
    for one: (its output folder, its result). For a module-scoped fixture: `yield from start_scenarios(...)`."""
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {name: pool.submit(job, assets, root / name / "run") for name, job in scenarios.items()}

    class Results:
        def __getitem__(self, name: str):
            return root / name / "run", futures[name].result(timeout=900)

    yield Results()
    pool.shutdown(wait=True, cancel_futures=True)


RECIPE = REPO / "recipes" / "uptrain.py"


def recipe_command(args: list[str]) -> list[str]:
    return [sys.executable, str(RECIPE), *args]


def run_recipe(args: list[str], timeout: int = 600, hooks: str | None = None) -> subprocess.CompletedProcess:
    command = recipe_command(args) if hooks is None else hooked_command(args, hooks)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=recipe_env(), cwd=REPO)


def rows(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(out: Path) -> dict[int, float]:
    train = rows(out, "train")
    assert len({r["step"] for r in train}) == len(train), "a step was logged twice"
    return {r["step"]: r["loss"] for r in train}
