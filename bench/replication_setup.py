"""The setup half of bench/replicate_paper.py: its command line, where its data is, the machine it runs on, and
the keys under which finished work is cached (anything that changes a number changes a key).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from replication_analysis import QUICK, QUICK_T5, Config, parse_alpha, parse_list

ROOT = Path(__file__).resolve().parents[1]
GRID_VERSION = 2  # bump when a change in the bench changes the numbers of a cell


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
        "--arch",
        choices=["llama", "t5"],
        default="llama",
        help="llama (decoder-only, next-token loss) or t5 (the paper's T5.1.1, span corruption)",
    )
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
    values = dict(QUICK_T5 if args.arch == "t5" else QUICK) if args.quick else {}
    values["arch"] = args.arch
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
    if cfg.arch == "t5":
        from convert.errors import SpanCorruptionError
        from convert.text.span_corruption import SpanCorruption

        try:
            _ = SpanCorruption(input_length=cfg.block_size).raw_length
        except SpanCorruptionError as e:
            problems.append(f"--block-size is the T5 input length: {e}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    cfg.alphas = sorted(set(cfg.alphas))
    cfg.groups = sorted(set(cfg.groups))
    if cfg.headline_alpha not in cfg.alphas:
        cfg.headline_alpha = max(cfg.alphas)
    return cfg


def train_bpe(text_file: Path, vocab_size: int, folder: Path, specials: list[str], **roles: str | None):
    """A byte-level BPE trained on the training text (deterministic), with `specials` first in its vocabulary, saved
    as a transformers fast tokenizer whose special-token `roles` (eos_token=..., pad_token=...) name them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=None, **roles)
    fast.model_max_length = 1 << 30
    fast.save_pretrained(folder)
    return fast


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
    arch = {"arch": cfg.arch} if cfg.arch != "llama" else {}  # the llama runs keep their cached work
    return short_hash(
        {
            **arch,
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
    files = [
        "bench/replicate_paper.py",
        "bench/replication_setup.py",
        "bench/replication_analysis.py",
        "bench/replication_t5.py",
        "convert/text/span_corruption.py",
        "convert/eval/seq2seq.py",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "convert" / "uptrain").glob("*.py")),
        "convert/pipeline/conversion.py",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "convert" / "methods").glob("*.py")),
        "convert/eval/perplexity.py",
        "convert/text/sources.py",
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
