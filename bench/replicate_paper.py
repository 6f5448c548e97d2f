#!/usr/bin/env python
"""Replicate the GQA paper's conversion and uptraining experiments (Ainslie et al. 2023, figures 4 and 5) on a small
llama pretrained from scratch, with this project's own converter and uptraining recipe.

    python bench/replicate_paper.py --out docs/replication           # the full grid (42 min on a shared 2-core CPU)
    python bench/replicate_paper.py --quick --out /tmp/replication   # smoke run: tiny model, 1 G, 2 methods (~1 min)

One command does everything, in order:

 1. tokenizer  a byte-level BPE (4,096 tokens; 1,024 with --quick) trained with `tokenizers` on the training text;
               deterministic, so every run gets the same vocabulary. Nothing is downloaded.
 2. pretrain   a randomly initialised multi-head llama (8 heads of 32 dims, 4 layers, hidden 256), saved with
               save_pretrained, is trained by `recipes/uptrain.py` itself with a token budget on the training text
               (default: WikiText-2 `valid.txt`). The tokens it saw are the pretraining tokens D.
 3. convert    `convert_checkpoint` to G KV heads (MQA = 1, GQA-2, GQA-4) with each method: `mean` (the paper),
               `first`, `random` (the paper's ablations) and `calibrated` (this project's, when registered).
 4. uptrain    `recipes/uptrain.py` again, with the pretraining recipe (warmup + cosine schedule, batch, block
               size, data, optimizer), for alpha x D tokens (`compute_fraction=alpha`), alpha in {0, 1%, 5%, 10%};
               alpha = 0 is the converted model as it is. The peak learning rate is the one pretraining ended at
               (min_lr_ratio x lr), as when the paper continues T5's decaying schedule; re-warming to the
               pretraining peak makes even the unconverted MHA model worse (`--uptrain-lr` changes it). As a
               control, the MHA model itself is trained on for the same budgets: the part of a gain that is
               "more training", not recovery.
 5. evaluate  perplexity on the held-out text (default: WikiText-2 `test.txt`, never trained or calibrated on),
               windows of one block, evenly spaced over the whole file.

Seeds: `--seeds 0,1` runs every cell with the first seed, and the headline cells (`--headline` methods at alpha =
5%) and the alpha = 0 cells of seeded methods (random, calibrated) with every seed. The seed sets the conversion
(random heads, calibration sample) and the uptraining data order. The MHA model is pretrained once
(`--pretrain-seed`), so the spread is that of conversion and uptraining, not of pretraining.

Writes into --out: results.json (everything, with per-cell timings), results.md (the table and the verdict on each
of the paper's claims), fig_methods.png (figure 4's shape: perplexity per conversion method and G, at alpha = 0 and
5%) and fig_alpha.png (figure 5's shape: perplexity against alpha, one panel per G, with the MHA baseline).

Finished cells are kept under --work (one JSON file each, keyed by every setting that changes a number), so an
interrupted run continues where it stopped; `--fresh` ignores them. Converted and uptrained weights are deleted once
scored unless --keep-models. `--quiet` drops progress lines; `--json` prints results.json on stdout (progress goes to
stderr). Exit status 0 when the grid completed, 2 on bad arguments or missing data.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EOS = "<|endoftext|>"
SEEDED_METHODS = ("random", "calibrated")  # conversions that depend on the seed
GRID_VERSION = 2  # bump when a change in this file changes the numbers of a cell


# ============================================================================================== settings


@dataclass
class Config:
    # model
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 8
    # pretraining and uptraining recipe (shared)
    pretrain_tokens: int = 1_000_000
    block_size: int = 256
    micro_batch_size: int = 8
    lr: float = 1e-3
    uptrain_lr: float | None = None  # default: where pretraining's schedule ended, min_lr_ratio x lr (see above)
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    pretrain_seed: int = 0
    # the grid
    groups: list[int] = field(default_factory=lambda: [1, 2, 4])
    methods: list[str] = field(default_factory=lambda: ["mean", "first", "random", "calibrated"])
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.05, 0.10])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    headline_alpha: float = 0.05
    headline_methods: list[str] = field(default_factory=lambda: ["mean"])
    control: bool = True  # MHA trained on for the same budgets
    calibration_tokens: int = 8192
    # evaluation
    eval_windows: int = 96  # windows of block_size tokens, evenly spaced over the test file (0 = all)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def uptrain_peak_lr(self) -> float:
        return self.uptrain_lr if self.uptrain_lr is not None else self.min_lr_ratio * self.lr


QUICK = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=172,
    num_layers=2,
    num_heads=4,
    pretrain_tokens=160_000,
    block_size=128,
    micro_batch_size=8,
    lr=3e-3,
    groups=[1],
    methods=["mean", "random"],
    alphas=[0.0, 0.05],
    seeds=[0],
    headline_methods=["mean"],
    control=False,
    calibration_tokens=1024,
    eval_windows=32,
)


def parse_list(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --{name} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise SystemExit(f"error: --{name} is empty")
    return values


def parse_alpha(text: str) -> float:
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Replicate the GQA paper's conversion-method and uptraining-fraction experiments on a small "
        "llama pretrained from scratch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults are the full grid; --quick switches to the smoke-test preset, and any option given "
        "explicitly overrides the preset.",
    )
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the two PNG figures")
    p.add_argument(
        "--data",
        help="training text (default: $GQA_DATA_DIR/wikitext-2/valid.txt, else "
        "../shared/data/wikitext-2/valid.txt beside the repository)",
    )
    p.add_argument("--test", help="held-out text scored for perplexity (default: wikitext-2/test.txt beside --data)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny model, MQA only, mean and random, alpha 0 and 5%%, one seed (about a minute on 2 cores)",
    )
    p.add_argument(
        "--work",
        help="cache of finished cells and the pretrained model "
        "(default: $GQA_CONVERT_CACHE or ~/.cache/gqa-convert, /replicate-HASH)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore finished cells in --work: recompute everything")
    p.add_argument("--keep-models", action="store_true", help="keep converted and uptrained weights under --work")
    p.add_argument(
        "--threads",
        default="auto",
        help="torch threads; auto: 1 when the CPU is already busy (load average >= cores - 0.5), else all cores",
    )
    p.add_argument("--groups", help="KV-head counts, e.g. 1,2,4 (1 = MQA)")
    p.add_argument("--methods", help="conversion methods, e.g. mean,first,random,calibrated")
    p.add_argument("--alphas", help="uptraining fractions of the pretraining tokens, e.g. 0,1%%,5%%,10%%")
    p.add_argument(
        "--seeds",
        help="seeds, e.g. 0,1: all cells run with the first; the others run the headline "
        "cells and the alpha = 0 cells of seeded methods (random, calibrated)",
    )
    p.add_argument("--headline", help="methods run with every seed at the headline alpha (default: mean)")
    p.add_argument("--headline-alpha", type=parse_alpha, help="alpha of the headline cells (default 5%%)")
    p.add_argument("--no-control", action="store_true", help="skip the MHA trained on for the same budgets")
    p.add_argument("--pretrain-tokens", type=int, help="pretraining budget in tokens")
    p.add_argument("--pretrain-seed", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of pretraining")
    p.add_argument("--uptrain-lr", type=float, help="peak learning rate of uptraining (default: --lr)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--layers", type=int, dest="num_layers")
    p.add_argument("--heads", type=int, dest="num_heads")
    p.add_argument("--block-size", type=int)
    p.add_argument("--batch", type=int, dest="micro_batch_size", help="blocks per step")
    p.add_argument("--eval-windows", type=int, help="test windows scored, evenly spaced (0 = the whole file)")
    p.add_argument("--calibration-tokens", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print results.json on stdout (progress on stderr)")
    return p


def make_config(args: argparse.Namespace) -> Config:
    values = dict(QUICK) if args.quick else {}
    simple = (
        "pretrain_tokens",
        "pretrain_seed",
        "lr",
        "uptrain_lr",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "block_size",
        "micro_batch_size",
        "eval_windows",
        "calibration_tokens",
        "headline_alpha",
    )
    for key in simple:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.groups:
        values["groups"] = parse_list(args.groups, int, "groups")
    if args.methods:
        values["methods"] = parse_list(args.methods, str, "methods")
    if args.alphas:
        values["alphas"] = parse_list(args.alphas, parse_alpha, "alphas")
    if args.seeds:
        values["seeds"] = parse_list(args.seeds, int, "seeds")
    if args.headline:
        values["headline_methods"] = parse_list(args.headline, str, "headline")
    if args.no_control:
        values["control"] = False
    cfg = Config(**values)
    problems = []
    if cfg.hidden_size % cfg.num_heads:
        problems.append(f"--heads {cfg.num_heads} must divide --hidden-size {cfg.hidden_size}")
    bad = [g for g in cfg.groups if g < 1 or cfg.num_heads % g or g >= cfg.num_heads]
    if bad:
        problems.append(f"--groups {bad}: each G must divide the {cfg.num_heads} heads and be smaller than it")
    bad_alpha = [a for a in cfg.alphas if not 0 <= a <= 1]
    if bad_alpha:
        problems.append(f"--alphas {bad_alpha}: fractions in [0, 1] (5% is 0.05 or 5%)")
    for key in ("pretrain_tokens", "block_size", "micro_batch_size", "vocab_size", "lr"):
        if getattr(cfg, key) <= 0:
            problems.append(f"--{key.replace('_', '-')} must be positive")
    if cfg.eval_windows < 0:
        problems.append("--eval-windows must be >= 0")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    cfg.alphas = sorted(set(cfg.alphas))
    cfg.groups = sorted(set(cfg.groups))
    if cfg.headline_alpha not in cfg.alphas:
        cfg.headline_alpha = max(cfg.alphas)
    return cfg


def default_data(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit).expanduser()
    else:
        base = os.environ.get("GQA_DATA_DIR")
        path = (Path(base) if base else ROOT.parent / "shared" / "data") / "wikitext-2" / "valid.txt"
    if not path.is_file():
        raise SystemExit(
            f"error: training text {path} not found: pass --data FILE.txt, or set GQA_DATA_DIR to the folder "
            f"holding wikitext-2/valid.txt and test.txt"
        )
    return path


def default_test(explicit: str | None, data: Path) -> Path:
    path = Path(explicit).expanduser() if explicit else data.parent / "test.txt"
    if not path.is_file():
        raise SystemExit(f"error: held-out text {path} not found: pass --test FILE.txt")
    if path.resolve() == data.resolve():
        raise SystemExit("error: --test is the training text: perplexity must be measured on held-out text")
    return path


def choose_threads(value: str) -> int:
    cores = os.cpu_count() or 1
    if value != "auto":
        return max(1, int(value))
    # Under oversubscription, torch's intra-op threads spin and wait on each other: one thread is faster then.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if load >= cores - 0.5 else cores


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ============================================================================================== output


class Log:
    def __init__(self, quiet: bool, to_stderr: bool):
        self.quiet, self.stream, self.start = quiet, sys.stderr if to_stderr else sys.stdout, time.time()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{fmt_seconds(time.time() - self.start):>7}] {message}", file=self.stream, flush=True)


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def pct(alpha: float) -> str:
    return f"{alpha * 100:g}%"


def g_name(g: int, heads: int) -> str:
    return "MQA" if g == 1 else f"GQA-{g}"


# ============================================================================================== pieces


def train_tokenizer(text_file: Path, vocab_size: int, folder: Path):
    """A byte-level BPE trained on the training text (deterministic), saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    fast.model_max_length = 1 << 30
    fast.save_pretrained(folder)
    return fast


def init_model(cfg: Config, tokenizer, folder: Path) -> int:
    """A randomly initialised MHA llama saved with save_pretrained beside the tokenizer; returns its parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(cfg.pretrain_seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def test_ids(tokenizer, path: Path, block: int, windows: int) -> tuple[torch.Tensor, dict]:
    """The held-out windows, concatenated: scoring them with window = stride = block scores exactly these windows."""
    from convert.evaluate import tokenize_file

    ids = tokenize_file(tokenizer, str(path))
    total = len(ids) // block
    if total < 1:
        raise SystemExit(f"error: {path} has {len(ids)} tokens, fewer than one block ({block})")
    chosen = list(range(total)) if windows == 0 or windows >= total else [i * total // windows for i in range(windows)]
    picked = torch.cat([ids[i * block : (i + 1) * block] for i in chosen])
    info = {
        "file": str(path),
        "file_tokens": len(ids),
        "window": block,
        "stride": block,
        "windows": len(chosen),
        "windows_in_file": total,
        "tokens_scored": len(chosen) * (block - 1),
    }
    return picked, info


def score(folder: Path, ids: torch.Tensor, block: int) -> dict:
    from transformers import AutoModelForCausalLM

    from convert.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    result = perplexity(model, ids, window=block, batch_size=8)
    del model
    return {"ppl": result.ppl, "nll": result.nll, "scored_tokens": result.tokens}


_RECIPE = None


def recipe():
    """recipes/uptrain.py imported once, so every run shares this process (no interpreter start per cell)."""
    global _RECIPE
    if _RECIPE is None:
        spec = importlib.util.spec_from_file_location("gqa_uptrain_recipe", ROOT / "recipes" / "uptrain.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        _RECIPE = module
    return _RECIPE


def train(
    cfg: Config, model: Path, output: Path, data: Path, seed: int, lr: float, budget: dict, quiet: bool = True
) -> dict:
    """One run of the uptraining recipe (pretraining too): returns its training_summary.json."""
    if output.exists():
        shutil.rmtree(output)  # a half-finished run of an interrupted replication
    argv = [
        f"model={model}",
        f"output_dir={output}",
        f"data={data}",
        "train=full",
        f"block_size={cfg.block_size}",
        f"micro_batch_size={cfg.micro_batch_size}",
        "grad_accum=1",
        f"seed={seed}",
        f"lr={lr}",
        f"warmup_ratio={cfg.warmup_ratio}",
        f"min_lr_ratio={cfg.min_lr_ratio}",
        f"weight_decay={cfg.weight_decay}",
        "validation_fraction=0",
        "eval_every=0",
        "save_every=0",
        "report_to=none",
        "model_dtype=float32",
        *[f"{k}={v}" for k, v in budget.items()],
    ]
    if quiet:
        argv.append("--quiet")
    rc = recipe().main(argv)
    if rc != 0:
        raise RuntimeError(f"recipes/uptrain.py failed (exit {rc}) with: {' '.join(argv)}")
    return json.loads((output / "model" / "training_summary.json").read_text())


def available_methods(wanted: list[str]) -> tuple[list[str], list[str]]:
    """The requested methods that are registered (importing the calibrated one when it exists), and notes."""
    from convert.methods import METHODS

    notes = []
    if "calibrated" in wanted and "calibrated" not in METHODS:
        try:
            import convert.calibrate  # noqa: F401  registers "calibrated"
        except Exception as e:  # missing or broken module: run the rest, say why
            notes.append(
                f"method 'calibrated' left out: convert.calibrate could not be imported ({type(e).__name__}: {e})"
            )
    keep = [m for m in wanted if m in METHODS]
    for m in wanted:
        if m not in METHODS and not any(m in n for n in notes):
            notes.append(f"method {m!r} left out: not registered (known: {', '.join(METHODS)})")
    return keep, notes


# ============================================================================================== the grid


@dataclass
class Cell:
    kind: str  # "mha", "control", "gqa"
    groups: int
    method: str
    alpha: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}-g{self.groups}-{self.method}-a{self.alpha:g}-s{self.seed}"


class Runner:
    def __init__(
        self, cfg: Config, data: Path, test: Path, work: Path, log: Log, fresh: bool, keep_models: bool, quiet: bool
    ):
        self.cfg, self.data, self.test, self.work, self.log = cfg, data, test, work, log
        self.fresh, self.keep_models, self.quiet = fresh, keep_models, quiet
        self.cells_dir = work / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.tag = cell_tag(cfg, test)

    # ------------------------------------------------------------------ cache
    def cached(self, name: str) -> dict | None:
        path = self.cells_dir / f"{name}-{self.tag}.json"
        if self.fresh or not path.is_file():
            return None
        return json.loads(path.read_text())

    def store(self, name: str, row: dict) -> dict:
        tmp = self.cells_dir / f".{name}-{self.tag}.json.tmp"
        tmp.write_text(json.dumps(row, indent=2))
        os.replace(tmp, self.cells_dir / f"{name}-{self.tag}.json")
        return row

    # ------------------------------------------------------------------ stages
    def prepare(self) -> dict:
        cfg = self.cfg
        t0 = time.time()
        tok_dir = self.work / "tokenizer"
        self.tokenizer = train_tokenizer(self.data, cfg.vocab_size, tok_dir)
        self.ids, self.eval_info = test_ids(self.tokenizer, self.test, cfg.block_size, cfg.eval_windows)
        from convert.evaluate import tokenize_file

        self.train_tokens = len(tokenize_file(self.tokenizer, str(self.data)))
        self.log(
            f"tokenizer: byte-level BPE, {len(self.tokenizer):,} tokens, trained on {self.data.name} "
            f"({self.train_tokens:,} tokens) in {time.time() - t0:.1f} s; "
            f"test: {self.eval_info['windows']} windows x {cfg.block_size} tokens "
            f"of {self.eval_info['file_tokens']:,}"
        )
        return {"tokenizer_seconds": time.time() - t0}

    def pretrain(self) -> dict:
        """The MHA model (trained once per work folder), with the random init's and its own test scores."""
        cfg = self.cfg
        init, mha = self.work / "init", self.work / "mha" / "model"
        done = self.work / "pretrain.json"
        key = work_hash(cfg, self.data)
        row = json.loads(done.read_text()) if done.is_file() else None
        if (
            not self.fresh
            and row is not None
            and row.get("key") == key
            and (mha / "config.json").is_file()
            and (init / "config.json").is_file()
        ):
            self.reused += 1
            self.log(
                f"pretrain: reused {mha} ({row['tokens']:,} tokens, {fmt_seconds(row['train_seconds'])} when trained)"
            )
        else:
            for old in (init, self.work / "mha"):
                shutil.rmtree(old, ignore_errors=True)
            done.unlink(missing_ok=True)
            params = init_model(cfg, self.tokenizer, init)
            self.log(
                f"pretrain: llama {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
                f"{cfg.head_dim}, {params:,} parameters; training {cfg.pretrain_tokens:,} tokens with "
                f"recipes/uptrain.py ..."
            )
            t1 = time.time()
            summary = train(
                cfg,
                init,
                self.work / "mha",
                self.data,
                cfg.pretrain_seed,
                cfg.lr,
                {"tokens": cfg.pretrain_tokens},
                quiet=self.quiet,
            )
            train_s = time.time() - t1
            row = {
                "parameters": params,
                "tokens": summary["tokens"],
                "steps": summary["steps"],
                "train_seconds": train_s,
                "tokens_per_s": summary["tokens"] / train_s,
                "final_train_loss": summary["final_train_loss"],
                "epochs": summary["tokens"] / self.train_tokens,
                "train_text_tokens": self.train_tokens,
                "key": key,
            }
            done.write_text(json.dumps(row, indent=2))
            self.log(
                f"pretrain: {row['steps']} steps, {row['tokens']:,} tokens ({row['epochs']:.1f} epochs of the "
                f"training text) in {fmt_seconds(train_s)} ({row['tokens_per_s']:,.0f} tokens/s)"
            )
        scores = self.cached("mha")
        if scores is None:
            t0 = time.time()
            scores = {"init_ppl": score(init, self.ids, cfg.block_size)["ppl"], **score(mha, self.ids, cfg.block_size)}
            scores["score_seconds"] = time.time() - t0
            self.store("mha", scores)
        row = {**row, **scores}
        self.log(f"pretrain: test perplexity {row['ppl']:.2f} (random init {row['init_ppl']:.1f})")
        return row

    def run_grid(self, pre: dict, methods: list[str]) -> list[dict]:
        cfg = self.cfg
        D = pre["tokens"]
        mha = self.work / "mha" / "model"
        uplr = cfg.uptrain_peak_lr
        rows = [
            {
                "kind": "mha",
                "groups": cfg.num_heads,
                "method": "-",
                "alpha": 0.0,
                "seed": cfg.pretrain_seed,
                "ppl": pre["ppl"],
                "nll": pre["nll"],
                "seconds": pre["train_seconds"],
            }
        ]
        trained = [a for a in cfg.alphas if a > 0]
        if cfg.control:
            for alpha in trained:
                cell = Cell("control", cfg.num_heads, "-", alpha, cfg.seeds[0])
                rows.append(self.uptrain_cell(cell, mha, D, uplr))
        total = len(cfg.groups) * len(methods)
        for gi, g in enumerate(cfg.groups):
            for mi, method in enumerate(methods):
                for si, seed in enumerate(cfg.seeds):
                    headline = method in cfg.headline_methods
                    wanted = [a for a in trained if si == 0 or (a == cfg.headline_alpha and headline)]
                    # mean and first ignore the seed: their alpha = 0 cell would repeat seed 0's number
                    at_zero = [0.0] if 0.0 in cfg.alphas and (si == 0 or method in SEEDED_METHODS) else []
                    names = [Cell("gqa", g, method, a, seed) for a in [*at_zero, *wanted]]
                    if not names:
                        continue
                    rows.extend(
                        self.conversion(g, method, seed, names, mha, D, uplr, f"{gi * len(methods) + mi + 1}/{total}")
                    )
        return rows

    def conversion(
        self, g: int, method: str, seed: int, cells: list[Cell], mha: Path, D: int, uplr: float, progress: str
    ) -> list[dict]:
        """Convert once, score it (alpha = 0), then uptrain a copy for each alpha."""
        cfg = self.cfg
        done = [self.cached(c.key) for c in cells]
        self.reused += sum(r is not None for r in done)
        if all(done):
            self.log(
                f"{progress} {g_name(g, cfg.num_heads)} {method} seed {seed}: reused "
                + ", ".join(f"{pct(r['alpha'])} {r['ppl']:.2f}" for r in done)
            )
            return done
        from convert import convert_checkpoint

        converted = self.work / "converted" / f"g{g}-{method}-s{seed}"
        options = None
        if method == "calibrated":
            options = {
                "calibration_data": str(self.data),
                "calibration_tokens": cfg.calibration_tokens,
                "calibration_seq_len": cfg.block_size,
            }
        t0 = time.time()
        report = convert_checkpoint(
            mha, converted, g, method, overwrite=True, seed=seed, progress=False, method_options=options
        )
        convert_s = time.time() - t0
        errs = [r for r in report.per_layer if "k_rel_err" in r]
        rel = {k: sum(r[k] for r in errs) / len(errs) for k in ("k_rel_err", "v_rel_err")} if errs else {}
        out = []
        for cell, cached in zip(cells, done):
            if cached is not None:
                out.append(cached)
                continue
            if cell.alpha == 0:
                t1 = time.time()
                s = score(converted, self.ids, cfg.block_size)
                row = {
                    **dataclasses.asdict(cell),
                    **s,
                    "convert_seconds": convert_s,
                    "uptrain_tokens": 0,
                    "uptrain_steps": 0,
                    "seconds": convert_s + time.time() - t1,
                    **rel,
                }
                out.append(self.store(cell.key, row))
            else:
                row = self.uptrain_cell(cell, converted, D, uplr, convert_s, rel)
                out.append(row)
        if not self.keep_models:
            shutil.rmtree(converted, ignore_errors=True)
        self.log(
            f"{progress} {g_name(g, cfg.num_heads)} {method:<10} seed {seed}: "
            + ", ".join(f"{pct(r['alpha'])} {r['ppl']:.2f}" for r in out)
        )
        return out

    def uptrain_cell(
        self, cell: Cell, model: Path, D: int, uplr: float, convert_s: float = 0.0, rel: dict | None = None
    ) -> dict:
        cached = self.cached(cell.key)
        if cached is not None:
            if cell.kind == "control":
                self.reused += 1
            return cached
        t0 = time.time()
        run_dir = self.work / "runs" / cell.key
        summary = train(
            self.cfg,
            model,
            run_dir,
            self.data,
            cell.seed,
            uplr,
            {"compute_fraction": cell.alpha, "pretraining_tokens": D},
        )
        train_s = time.time() - t0
        s = score(run_dir / "model", self.ids, self.cfg.block_size)
        if not self.keep_models:
            shutil.rmtree(run_dir, ignore_errors=True)
        row = {
            **dataclasses.asdict(cell),
            **s,
            "uptrain_tokens": summary["tokens"],
            "uptrain_steps": summary["steps"],
            "uptrain_seconds": train_s,
            "convert_seconds": convert_s,
            "seconds": time.time() - t0 + convert_s,
            **(rel or {}),
        }
        if cell.kind == "control":
            self.log(
                f"control: MHA trained on for {pct(cell.alpha)} ({summary['tokens']:,} tokens, "
                f"{summary['steps']} steps): {s['ppl']:.2f}"
            )
        return self.store(cell.key, row)


# ============================================================================================== analysis


def aggregate(rows: list[dict]) -> dict:
    """{(kind, groups, method, alpha): {"ppl": mean over seeds, "spread": (max - min) / 2, "n": seeds, ...}}."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["kind"], r["groups"], r["method"], r["alpha"]), []).append(r)
    out = {}
    for key, rs in cells.items():
        ppls = [r["ppl"] for r in rs]
        # mean of log perplexity (mean NLL) across seeds, shown as a perplexity
        mean_ppl = math.exp(sum(math.log(p) for p in ppls) / len(ppls))
        out[key] = {
            "ppl": mean_ppl,
            "spread": (max(ppls) - min(ppls)) / 2,
            "n": len(ppls),
            "seeds": [r["seed"] for r in rs],
            "values": ppls,
        }
    return out


def lookup(agg: dict, kind: str, g: int, method: str, alpha: float) -> dict | None:
    return agg.get((kind, g, method, alpha))


def check_claims(agg: dict, cfg: Config, methods: list[str]) -> list[dict]:
    """The paper's qualitative claims, each with the numbers it rests on and whether it holds here.

    Thresholds (stated so that the verdicts can be checked by hand):
      ranking      mean < first < random in perplexity at the headline alpha (and at the largest alpha), every G;
      usable       "usable right after conversion" = test perplexity at alpha = 0 within 1.5x the MHA model's;
      diminishing  most of the 0 -> 10% gain in log perplexity is reached at 5% (more than half), and the gain from
                   5% to 10% is smaller than the gain from 0 to 5%;
      close        at alpha = 5%, mean-pooled GQA within 5% of the MHA model's perplexity.
    """
    mha = lookup(agg, "mha", cfg.num_heads, "-", 0.0)["ppl"]
    claims = []
    ha, top = cfg.headline_alpha, max(cfg.alphas)
    g_all = cfg.groups

    # 1. mean > first > random after uptraining
    order = [m for m in ("mean", "first", "random") if m in methods]
    if len(order) >= 2 and ha > 0:
        details, holds = [], True
        for alpha in sorted({ha, top}):
            for g in g_all:
                vals = [lookup(agg, "gqa", g, m, alpha) for m in order]
                if any(v is None for v in vals):
                    continue
                ok = all(a["ppl"] < b["ppl"] for a, b in zip(vals, vals[1:]))
                holds &= ok
                details.append(
                    f"{g_name(g, cfg.num_heads)} at {pct(alpha)}: "
                    + ", ".join(f"{m} {v['ppl']:.2f}" for m, v in zip(order, vals))
                    + (" (in order)" if ok else " (order broken)")
                )
        claims.append(
            {
                "claim": f"after uptraining, {' > '.join(order)} (lower perplexity is better)",
                "holds": holds if details else None,
                "details": details,
            }
        )

    # 2. GQA usable right after conversion, MQA needs uptraining
    if "mean" in methods and 0.0 in cfg.alphas:
        details, gqa_ok, mqa_needs = [], None, None
        for g in g_all:
            v = lookup(agg, "gqa", g, "mean", 0.0)
            if v is None:
                continue
            ratio = v["ppl"] / mha
            usable = ratio <= 1.5
            details.append(
                f"{g_name(g, cfg.num_heads)} mean at 0%: {v['ppl']:.2f} = {ratio:.2f}x MHA "
                f"({'usable' if usable else 'not usable'})"
            )
            if g == 1:
                mqa_needs = not usable
            else:
                gqa_ok = usable if gqa_ok is None else (gqa_ok and usable)
        holds = None if gqa_ok is None or mqa_needs is None else (gqa_ok and mqa_needs)
        if gqa_ok is None and mqa_needs is not None:
            holds = mqa_needs  # only MQA in the grid: its half of the claim
        claims.append(
            {
                "claim": "GQA is usable right after conversion (within 1.5x MHA perplexity, mean pooling), "
                "MQA needs uptraining",
                "holds": holds,
                "details": details,
            }
        )

    # 3. gains from 5% with diminishing returns at 10%
    if {0.0, 0.05, 0.10} <= set(cfg.alphas) and "mean" in methods:
        details, holds = [], True
        for g in g_all:
            p0, p5, p10 = (lookup(agg, "gqa", g, "mean", a) for a in (0.0, 0.05, 0.10))
            if None in (p0, p5, p10):
                continue
            gain_5 = math.log(p0["ppl"]) - math.log(p5["ppl"])
            gain_10 = math.log(p5["ppl"]) - math.log(p10["ppl"])
            share = gain_5 / (gain_5 + gain_10) if gain_5 + gain_10 > 0 else float("nan")
            ok = gain_5 > 0 and gain_10 < gain_5 and share > 0.5
            holds &= ok
            details.append(
                f"{g_name(g, cfg.num_heads)} mean: {p0['ppl']:.2f} -> {p5['ppl']:.2f} (5%) -> "
                f"{p10['ppl']:.2f} (10%); {share:.0%} of the 0-10% gain (log ppl) reached at 5%"
            )
        claims.append(
            {
                "claim": "uptraining gains by 5%, with diminishing returns from 5% to 10%",
                "holds": holds if details else None,
                "details": details,
            }
        )

    # 4. GQA close to MHA at 5%
    if 0.05 in cfg.alphas and "mean" in methods:
        details, holds = [], True
        control = lookup(agg, "control", cfg.num_heads, "-", 0.05)
        for g in [g for g in g_all if g > 1] or g_all:
            v = lookup(agg, "gqa", g, "mean", 0.05)
            if v is None:
                continue
            ratio = v["ppl"] / mha
            ok = ratio <= 1.05
            holds &= ok
            more = (
                f", {v['ppl'] / control['ppl']:.3f}x the MHA trained on for 5% ({control['ppl']:.2f})"
                if control
                else ""
            )
            details.append(
                f"{g_name(g, cfg.num_heads)} mean at 5%: {v['ppl']:.2f} = {ratio:.3f}x MHA ({mha:.2f}){more}"
            )
        claims.append(
            {
                "claim": "GQA uptrained for 5% is close to MHA (within 5% perplexity)",
                "holds": holds if details else None,
                "details": details,
            }
        )
    return claims


def fmt_cell(v: dict | None) -> str:
    if v is None:
        return "–"
    text = f"{v['ppl']:.2f}"
    if v["n"] > 1:
        text += f" ± {v['spread']:.2f} (n={v['n']})"
    return text


def markdown(results: dict) -> str:
    cfg = Config(**results["config"])
    agg = {tuple(k): v for k, v in ((tuple(json.loads(k)), v) for k, v in results["aggregate"].items())}
    methods = results["methods"]
    alphas = cfg.alphas
    pre, ev = results["pretrain"], results["eval"]
    lines = [
        f"# GQA replication ({'quick' if results['quick'] else 'full'} run)",
        "",
        f"Command: `{results['command']}`  ",
        f"Hardware: {results['hardware']['summary']}  ",
        f"Wall time: {fmt_seconds(results['wall_seconds'])}"
        + (f" ({results['cells_reused']} cells reused from an earlier run)" if results["cells_reused"] else ""),
        "",
        f"Model: llama, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}, "
        f"{pre['parameters']:,} parameters, byte-level BPE of {results['tokenizer']['vocab_size']:,} tokens trained "
        f"on `{Path(results['data']).name}`. Pretrained from scratch with `recipes/uptrain.py` for "
        f"{pre['tokens']:,} tokens ({pre['steps']} steps of {cfg.micro_batch_size} x {cfg.block_size}, peak lr "
        f"{cfg.lr}, warmup {cfg.warmup_ratio:.0%}, cosine to {cfg.min_lr_ratio} x lr). Uptraining: the same recipe "
        f"(peak lr {cfg.uptrain_peak_lr:g}, where pretraining's schedule ended) for alpha x {pre['tokens']:,} tokens.",
        "",
        f"Test perplexity on `{Path(ev['file']).name}`: {ev['windows']} windows of {ev['window']} tokens "
        f"(stride {ev['stride']}, evenly spaced over the file's {ev['windows_in_file']}), {ev['tokens_scored']:,} "
        f"tokens scored. Lower is better. ± is half the range (max - min) / 2 over n seeds; cells without n ran once "
        f"(seed {cfg.seeds[0]}); multi-seed cells show the geometric mean.",
        "",
        "| model | KV heads | " + " | ".join(f"α = {pct(a)}" for a in alphas) + " |",
        "|---|---|" + "---|" * len(alphas),
        f"| random init (no training) | {cfg.num_heads} | {pre['init_ppl']:.1f} |" + " |" * (len(alphas) - 1),
    ]
    mha_row = [fmt_cell(lookup(agg, "mha", cfg.num_heads, "-", 0.0))]
    for a in alphas[1:]:
        mha_row.append(fmt_cell(lookup(agg, "control", cfg.num_heads, "-", a)) if cfg.control else "")
    lines.append(
        f"| MHA (pretrained{'; α > 0: trained on, control' if cfg.control else ''}) | {cfg.num_heads} | "
        + " | ".join(mha_row)
        + " |"
    )
    for g in cfg.groups:
        for m in methods:
            cells = [fmt_cell(lookup(agg, "gqa", g, m, a)) for a in alphas]
            lines.append(f"| {g_name(g, cfg.num_heads)} {m} | {g} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims", ""]
    for c in results["claims"]:
        verdict = {True: "**holds**", False: "**does not hold**", None: "not tested"}[c["holds"]]
        lines.append(f"- {c['claim']}: {verdict}")
        lines += [f"  - {d}" for d in c["details"]]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    lines += ["", "![conversion methods](fig_methods.png)", "", "![perplexity against alpha](fig_alpha.png)", ""]
    return "\n".join(lines)


COLORS = {"mean": "tab:blue", "first": "tab:orange", "random": "tab:green", "calibrated": "tab:purple"}


def perplexity_axis(ax, values: list[float]) -> None:
    """Log scale with plain 1-2-5 labels when the values span a factor of 3 or more; linear otherwise."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [v for v in values if v and math.isfinite(v)]
    if values and max(values) / min(values) >= 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("test perplexity (log scale)")
    else:
        ax.set_ylabel("test perplexity")


def plot_methods(results: dict, path: Path) -> None:
    """Figure 4's shape: perplexity of each conversion method, per G, at alpha = 0 and at the headline alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = Config(**results["config"])
    agg = {tuple(json.loads(k)): v for k, v in results["aggregate"].items()}
    methods, mha = results["methods"], results["pretrain"]["ppl"]
    panels = [a for a in sorted({0.0, cfg.headline_alpha}) if a in cfg.alphas]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False)
    width = 0.8 / len(methods)
    for ax, alpha in zip(axes[0], panels):
        shown: list[float] = []
        for mi, m in enumerate(methods):
            xs, ys, errs = [], [], []
            for gi, g in enumerate(cfg.groups):
                v = lookup(agg, "gqa", g, m, alpha)
                if v is None:
                    continue
                xs.append(gi + (mi - (len(methods) - 1) / 2) * width)
                ys.append(v["ppl"])
                errs.append(v["spread"] if v["n"] > 1 else 0)
            bars = ax.bar(xs, ys, width, yerr=errs if any(errs) else None, capsize=3, label=m, color=COLORS.get(m))
            ax.bar_label(bars, [f"{y:.1f}" for y in ys], fontsize=7, padding=2)
            shown.extend(ys)
        ax.axhline(mha, color="black", ls="--", lw=1, label=f"MHA {mha:.1f}")
        ax.set_xticks(range(len(cfg.groups)), [g_name(g, cfg.num_heads) for g in cfg.groups])
        perplexity_axis(ax, shown + [mha])
        if ax.get_yscale() == "linear":
            ax.set_ylim(0, max(shown + [mha]) * 1.12)
        ax.set_title("right after conversion (α = 0)" if alpha == 0 else f"uptrained, α = {pct(alpha)}")
        ax.grid(axis="y", alpha=0.3, which="both")
    save_figure(fig, axes[0][0], "Conversion methods (cf. GQA paper, figure 4)", 0.06, path)


def plot_alpha(results: dict, path: Path) -> None:
    """Figure 5's shape: perplexity against the uptraining fraction, one panel per G, MHA as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = Config(**results["config"])
    agg = {tuple(json.loads(k)): v for k, v in results["aggregate"].items()}
    methods, mha = results["methods"], results["pretrain"]["ppl"]
    xs = [a * 100 for a in cfg.alphas]
    fig, axes = plt.subplots(
        1, len(cfg.groups), figsize=(4.6 * len(cfg.groups), 4.2), dpi=110, squeeze=False, sharey=True
    )
    shown: list[float] = [mha]
    for ax, g in zip(axes[0], cfg.groups):
        for m in methods:
            pts = [(a * 100, lookup(agg, "gqa", g, m, a)) for a in cfg.alphas]
            pts = [(x, v) for x, v in pts if v is not None]
            shown.extend(v["ppl"] for _, v in pts)
            ax.errorbar(
                [x for x, _ in pts],
                [v["ppl"] for _, v in pts],
                yerr=[v["spread"] if v["n"] > 1 else 0 for _, v in pts],
                marker="o",
                ms=4,
                capsize=3,
                label=m,
                color=COLORS.get(m),
            )
        ax.axhline(mha, color="black", ls="--", lw=1, label="MHA")
        if cfg.control:
            ctrl = [(a * 100, lookup(agg, "control", cfg.num_heads, "-", a)) for a in cfg.alphas if a > 0]
            ctrl = [(0.0, {"ppl": mha})] + [(x, v) for x, v in ctrl if v is not None]
            ax.plot(
                [x for x, _ in ctrl],
                [v["ppl"] for _, v in ctrl],
                color="gray",
                ls=":",
                marker="s",
                ms=3,
                label="MHA trained on (control)",
            )
        ax.set_xticks(xs, [f"{x:g}%" for x in xs])
        ax.set_xlabel("uptraining α (% of pretraining tokens)")
        ax.set_title(g_name(g, cfg.num_heads) + f" ({g} KV head{'s' if g > 1 else ''})")
        ax.grid(alpha=0.3, which="both")
    perplexity_axis(axes[0][0], shown)  # the panels share the y axis
    save_figure(fig, axes[0][0], "Perplexity against uptraining proportion (cf. GQA paper, figure 5)", 0.07, path)


def save_figure(fig, legend_from, title: str, legend_height: float, path: Path) -> None:
    """One legend along the bottom (taken from one panel), the title, then write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    handles, labels = legend_from.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(path)
    plt.close(fig)


# ============================================================================================== main


def hardware(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem = None
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        pass
    summary = (
        f"{cores}-core CPU ({cpu}), torch {threads} thread{'s' if threads > 1 else ''}"
        + (f", {mem / 2**30:.0f} GiB RAM" if mem else "")
        + (f", GPU {gpu} (unused)" if gpu else "")
        + ", no GPU used"
    )
    return {
        "cpu": cpu,
        "cores": cores,
        "threads": threads,
        "memory_bytes": mem,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "summary": summary,
    }


PRETRAIN_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "pretrain_tokens",
    "block_size",
    "micro_batch_size",
    "lr",
    "warmup_ratio",
    "min_lr_ratio",
    "weight_decay",
    "pretrain_seed",
)
CELL_KEYS = ("uptrain_lr", "calibration_tokens", "eval_windows")  # and the pretraining (the work folder)


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def work_hash(cfg: Config, data: Path) -> str:
    """The work folder holds one pretrained model: keyed by what decides it."""
    return short_hash(
        {
            "pretrain": {k: getattr(cfg, k) for k in PRETRAIN_KEYS},
            "data": file_digest(data),
            "grid_version": GRID_VERSION,
        }
    )


def cell_tag(cfg: Config, test: Path) -> str:
    """What else changes a cell's number. The grid's extent does not: a larger grid reuses a smaller one's cells."""
    return short_hash(
        {"cell": {k: getattr(cfg, k) for k in CELL_KEYS}, "test": file_digest(test), "grid_version": GRID_VERSION}
    )


def provenance() -> dict:
    """The code that produced the numbers: git HEAD and a digest of each file involved (some may be uncommitted)."""
    import subprocess

    files = [
        "bench/replicate_paper.py",
        "recipes/uptrain.py",
        "convert/checkpoint.py",
        "convert/methods.py",
        "convert/calibrate.py",
        "convert/evaluate.py",
        "convert/data.py",
    ]
    out = {"files": {f: file_digest(ROOT / f) for f in files if (ROOT / f).is_file()}}
    try:
        out["git_head"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", *files], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout
        out["uncommitted"] = sorted(line[3:] for line in status.splitlines())
    except (OSError, subprocess.SubprocessError):
        out["git_head"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        cfg = make_config(args)
        data = default_data(args.data)
        test = default_test(args.test, data)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    start = time.time()
    code = provenance()  # before anything is imported: the files as this run reads them
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    log = Log(args.quiet, args.json)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("GQA_CONVERT_CACHE", Path.home() / ".cache" / "gqa-convert"))
    work = Path(args.work) if args.work else cache / f"replicate-{work_hash(cfg, data)}"
    work.mkdir(parents=True, exist_ok=True)
    methods, notes = available_methods(cfg.methods)
    for n in notes:
        log(n)
    hw = hardware(threads)
    log(
        f"replicate: {len(cfg.groups)} G x {len(methods)} methods x alphas {', '.join(pct(a) for a in cfg.alphas)}"
        f", seeds {cfg.seeds}; {hw['summary']}; work {work}"
    )

    runner = Runner(cfg, data, test, work, log, args.fresh, args.keep_models, args.quiet or args.json)
    timings = runner.prepare()
    pre = runner.pretrain()
    rows = runner.run_grid(pre, methods)
    agg = aggregate(rows)
    claims = check_claims(agg, cfg, methods)
    if pre["ppl"] >= pre["init_ppl"]:
        notes.append(
            f"the pretrained MHA model ({pre['ppl']:.2f}) does not beat its random init "
            f"({pre['init_ppl']:.2f}): the run is not meaningful"
        )
    wall = time.time() - start
    command = "python bench/replicate_paper.py " + " ".join(argv)
    results = {
        "command": command,
        "quick": args.quick,
        "config": dataclasses.asdict(cfg),
        "methods": methods,
        "data": str(data),
        "test": str(test),
        "work": str(work),
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers), trained on the training text",
            "vocab_size": len(runner.tokenizer),
            "seconds": timings["tokenizer_seconds"],
        },
        "eval": runner.eval_info,
        "pretrain": pre,
        "rows": rows,
        "aggregate": {json.dumps(list(k)): v for k, v in agg.items()},
        "claims": claims,
        "notes": notes,
        "hardware": hw,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_seconds": wall,
        "cells_reused": runner.reused,
        "provenance": code,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot_methods(results, out / "fig_methods.png")
    plot_alpha(results, out / "fig_alpha.png")
    log(f"done in {fmt_seconds(wall)}: {out}/results.md, results.json, fig_methods.png, fig_alpha.png")
    for c in claims:
        log(f"  {'holds' if c['holds'] else 'not tested' if c['holds'] is None else 'does NOT hold'}: {c['claim']}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
