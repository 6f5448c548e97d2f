#!/usr/bin/env python
"""Uptrain a converted GQA/MQA checkpoint: budgeted continued pretraining on accelerate.

Converting multi-head attention to grouped-query (GQA) or multi-query (MQA) attention costs quality; the GQA paper
(Ainslie et al., 2023) wins it back by continuing pretraining for a small fraction alpha of the original steps
(alpha = 5%). This script is that step: one CPU, one GPU, or many GPUs and nodes through `accelerate launch`.

Launch it from the repository root (see recipes/README.md for every setting):

    # one process (CPU or one GPU)
    python recipes/uptrain.py recipes/configs/smollm2-mqa-cpu.yaml
    accelerate launch recipes/uptrain.py recipes/configs/smollm2-mqa-cpu.yaml max_steps=20 --lr 3e-4

    # several processes on one machine (GPUs, or CPU processes over gloo), DDP
    accelerate launch --config_file recipes/accelerate_ddp.yaml --num_processes 8 \
        recipes/uptrain.py recipes/configs/smollm2-mqa-cpu.yaml

    # a 7B llama sharded with FSDP over 2 nodes x 8 GPUs (run on every node with its --machine_rank)
    accelerate launch --config_file recipes/accelerate_fsdp.yaml --num_machines 2 --num_processes 16 \
        --machine_rank 0 --main_process_ip HOST recipes/uptrain.py recipes/configs/llama-7b-fsdp.yaml

Settings come from a YAML file with `key=value` or `--key value` overrides after it; `--quiet` drops the progress
bar and the chatter, `--json` prints the training summary as JSON on stdout (the chatter goes to stderr).

Everything a run writes lands in `output_dir`:
    checkpoints/step-000100/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    metrics.jsonl              one row per step ("train") and per evaluation ("eval")
    loss.png                   train and validation loss against tokens
    logs/                      accelerate trackers (tensorboard when installed)
    model/                     the result: safetensors + tokenizer + model card + training_summary.json,
                               loadable with AutoModelForCausalLM.from_pretrained("OUTPUT_DIR/model")
The data order is a pure function of (seed, step), so `resume: auto` restarts exactly where a checkpoint was taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import itertools
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# accelerate warns on every checkpoint of a model with tied embeddings that it stored the shared tensor once: expected.
import logging

logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

import torch  # noqa: E402
import yaml  # noqa: E402

try:
    from convert import data as textdata
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from convert import data as textdata

SCOPES = ("full", "attention", "kv", "lora")
DTYPES = ("float32", "bfloat16", "float16")
CHECKPOINT_PREFIX = "step-"


# ============================================================================================== settings


@dataclass
class Settings:
    # --- model and what is trained
    model: str = ""  # converted checkpoint folder: config.json, weights, tokenizer
    output_dir: str = ""
    train: str = "full"  # full (the paper) | attention | kv (K/V projections only) | lora
    kv_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj"])  # names of the K/V projections
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    model_dtype: str = "float32"  # dtype of the trained weights (use mixed_precision for bf16 compute)
    save_dtype: str | None = None  # dtype of the saved model (default: the input checkpoint's)
    mixed_precision: str | None = None  # no | bf16 | fp16; default: accelerate's config or launch flag
    gradient_checkpointing: bool = False
    # --- data
    data: str | list[str] = ""  # local .txt/.jsonl/.json/.parquet files (globs ok) or a hub dataset name
    data_config: str | None = None  # hub dataset config
    data_split: str = "train"  # hub dataset split
    text_column: str = "text"
    txt_documents: str = "auto"  # auto | wikitext | paragraphs | lines | file (see convert/data.py)
    streaming: bool = False  # read the corpus lazily (larger than memory or disk)
    shuffle_buffer: int = 10_000  # documents in the streaming shuffle buffer
    validation: str | list[str] | None = None  # held-out source; default: `data` itself
    validation_split: str | None = None  # split of the held-out source (e.g. "validation")
    validation_fraction: float = 0.05  # without validation/validation_split: fraction of documents carved out
    max_eval_blocks: int = 32  # validation blocks scored at each evaluation
    block_size: int = 512
    micro_batch_size: int = 4  # blocks per process per forward pass
    grad_accum: int = 1  # global batch = micro_batch_size x grad_accum x processes blocks
    seed: int = 0
    # --- budget: exactly one of max_steps, tokens, compute_fraction (with pretraining_tokens)
    max_steps: int | None = None
    tokens: int | None = None
    compute_fraction: float | None = None  # alpha: tokens = alpha x pretraining_tokens
    pretraining_tokens: int | None = None  # tokens of the original pretraining (also reports alpha)
    # --- optimisation: AdamW, linear warmup, cosine decay to min_lr_ratio x lr
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: warmup_ratio x steps
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    # --- distillation from the original model (beyond the paper)
    teacher: str | None = None
    kd_weight: float = 0.5  # loss = (1 - kd_weight) x LM + kd_weight x T^2 x KL(teacher || student)
    kd_temperature: float = 1.0
    # --- evaluation, checkpoints, logging
    eval_every: int = 50  # steps; 0 = only at the start and the end
    save_every: int = 100  # steps; 0 = no periodic checkpoints
    keep_checkpoints: int = 2
    resume: str = "never"  # never | auto (newest complete checkpoint in output_dir) | a checkpoint folder
    report_to: str = "auto"  # auto (tensorboard when installed) | none | tensorboard | wandb | ... (comma list)


# Settings that decide the trajectory of a run: a checkpoint resumes only under the same values.
RUN_KEYS = (
    "model",
    "train",
    "kv_modules",
    "lora_modules",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "model_dtype",
    "mixed_precision",
    "data",
    "data_config",
    "data_split",
    "text_column",
    "txt_documents",
    "streaming",
    "shuffle_buffer",
    "validation",
    "validation_split",
    "validation_fraction",
    "max_eval_blocks",
    "block_size",
    "seed",
    "lr",
    "min_lr_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "max_grad_norm",
    "teacher",
    "kd_weight",
    "kd_temperature",
)  # plus the derived global batch, steps and warmup steps


class SettingsError(ValueError):
    """Bad settings or inputs, found before any compute."""


class TrainingError(RuntimeError):
    """A fault during training (a non-finite loss)."""


class WriteError(RuntimeError):
    """Writing a checkpoint or the model failed: a full disk, a file-size limit, a lost mount."""


def _coerce(name: str, value, hint):
    """`value` (from YAML, or a raw command-line string) as the type the Settings field declares."""
    from_cli = isinstance(value, str)
    args = typing.get_args(hint)
    if args and type(None) in args:  # Optional[...]
        if value is None or (from_cli and value.lower() in ("null", "none", "~", "")):
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        # str | list[str]: a list when it looks like one
        if isinstance(value, list) or (from_cli and value.strip().startswith("[")):
            return _coerce(name, value, list[str])
        return _coerce(name, value, str)
    if typing.get_origin(hint) is list:
        if from_cli:
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise SettingsError(f"{name} must be a list of names, got {value!r}")
        return [str(v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise SettingsError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number != int(number):
            raise SettingsError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    if hint is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if hint is str:
        if name == "mixed_precision" and value is False:  # YAML reads a bare `no` as false
            return "no"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise SettingsError(f"{name} must be a string, got {value!r} (quote it in YAML)")
        return value
    raise SettingsError(f"{name}: unsupported setting type {hint}")


USAGE = """usage: python recipes/uptrain.py CONFIG.yaml [key=value | --key value ...] [--quiet] [--json]
       accelerate launch [accelerate options] recipes/uptrain.py CONFIG.yaml [...]
Settings (defaults in parentheses); see recipes/README.md:
"""


def parse_args(argv: list[str]) -> tuple[Settings, dict]:
    """Settings from a YAML file plus overrides, and the output options (quiet, json)."""
    hints = typing.get_type_hints(Settings)
    options = {"quiet": False, "json": False}
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE + "\n".join(f"  {f.name} ({_default(f)!r})" for f in dataclasses.fields(Settings)))
            raise SystemExit(0)
        if arg in ("--quiet", "-q"):
            options["quiet"] = True
        elif arg == "--json":
            options["json"] = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise SettingsError("--config needs a file")
            config_path, i = argv[i + 1], i + 1
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise SettingsError(f"{arg} needs a value")
                value, i = argv[i + 1], i + 1
            overrides[key.replace("-", "_")] = value
        elif "=" in arg:
            key, _, value = arg.partition("=")
            overrides[key.replace("-", "_")] = value
        elif config_path is None and arg.endswith((".yaml", ".yml")):
            config_path = arg
        else:
            raise SettingsError(f"unexpected argument {arg!r}: give CONFIG.yaml, then key=value or --key value")
        i += 1
    values: dict = {}
    if config_path is not None:
        if not Path(config_path).is_file():
            raise SettingsError(f"config file {config_path!r} does not exist")
        try:
            loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"config file {config_path!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {config_path!r} must hold a mapping of settings")
        values.update(loaded)
    values.update(overrides)
    unknown = [k for k in values if k not in hints]
    if unknown:
        lines = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(hints), n=1)
            lines.append(f"unknown setting {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SettingsError("; ".join(lines))
    return Settings(**{k: _coerce(k, v, hints[k]) for k, v in values.items()}), options


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_settings(s: Settings) -> None:
    """Every rule that needs no file: all problems at once, each with its fix."""
    problems = []
    for key in ("model", "output_dir", "data"):
        if not getattr(s, key):
            problems.append(f"{key} is not set")
    if s.train not in SCOPES:
        problems.append(f"train must be one of {', '.join(SCOPES)}, got {s.train!r}")
    for key in ("model_dtype", "save_dtype"):
        if getattr(s, key) is not None and getattr(s, key) not in DTYPES:
            problems.append(f"{key} must be one of {', '.join(DTYPES)}, got {getattr(s, key)!r}")
    if s.mixed_precision not in (None, "no", "bf16", "fp16"):
        problems.append(f"mixed_precision must be no, bf16 or fp16, got {s.mixed_precision!r}")
    if s.txt_documents not in textdata.TXT_MODES:
        problems.append(f"txt_documents must be one of {', '.join(textdata.TXT_MODES)}, got {s.txt_documents!r}")
    budgets = [k for k in ("max_steps", "tokens", "compute_fraction") if getattr(s, k) is not None]
    if len(budgets) != 1:
        problems.append(
            "give exactly one budget: max_steps, tokens, or compute_fraction (alpha, with pretraining_tokens)"
            + (f"; got {', '.join(budgets)}" if budgets else "")
        )
    for key in ("max_steps", "tokens", "compute_fraction", "pretraining_tokens"):
        value = getattr(s, key)
        if value is not None and value <= 0:
            problems.append(f"{key} must be positive, got {value}")
    if s.compute_fraction is not None:
        if s.compute_fraction > 1:
            problems.append(
                f"compute_fraction is alpha, a fraction of the pretraining tokens (0 < alpha <= 1), got "
                f"{s.compute_fraction}: for 5% write 0.05"
            )
        if s.pretraining_tokens is None:
            problems.append("compute_fraction needs pretraining_tokens (the tokens the original model saw)")
    positive = (
        "block_size",
        "micro_batch_size",
        "grad_accum",
        "keep_checkpoints",
        "max_eval_blocks",
        "shuffle_buffer",
        "lr",
        "kd_temperature",
        "adam_eps",
    )
    for key in positive:
        if getattr(s, key) <= 0:
            problems.append(f"{key} must be positive, got {getattr(s, key)}")
    if s.block_size < 2:
        problems.append(f"block_size must be at least 2, got {s.block_size}")
    for key in ("eval_every", "save_every", "weight_decay", "max_grad_norm", "lora_dropout"):
        if getattr(s, key) < 0:
            problems.append(f"{key} must not be negative, got {getattr(s, key)}")
    if s.warmup_steps is not None and s.warmup_steps < 0:
        problems.append(f"warmup_steps must not be negative, got {s.warmup_steps}")
    for key in ("min_lr_ratio", "warmup_ratio", "kd_weight"):
        if not 0 <= getattr(s, key) <= 1:
            problems.append(f"{key} must be in [0, 1], got {getattr(s, key)}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(s, key) < 1:
            problems.append(f"{key} must be in [0, 1), got {getattr(s, key)}")
    if not 0 <= s.validation_fraction < 1:
        problems.append(f"validation_fraction must be in [0, 1), got {s.validation_fraction}")
    if s.train == "lora" and s.lora_r <= 0:
        problems.append(f"lora_r must be positive, got {s.lora_r}")
    if s.train in ("kv", "attention", "lora") and not s.kv_modules:
        problems.append(f"train={s.train} needs kv_modules (the K/V projection names, e.g. [k_proj, v_proj])")
    if s.train == "lora":
        if not s.lora_modules:
            problems.append("train=lora needs lora_modules (e.g. [q_proj, o_proj])")
        both = sorted(set(s.lora_modules) & set(s.kv_modules))
        if both:
            problems.append(f"{', '.join(both)} cannot be both a LoRA target and fully trained (kv_modules)")
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            problems.append("train=lora is not supported under FSDP here: launch it with DDP (accelerate_ddp.yaml)")
    if s.resume not in ("never", "auto") and not Path(s.resume).is_dir():
        problems.append(f"resume must be never, auto or a checkpoint folder; {s.resume!r} is not a folder")
    if problems:
        raise SettingsError("bad settings:\n  - " + "\n  - ".join(problems))


def check_model_folder(path: str, role: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise SettingsError(f"{role} folder {path!r} does not exist")
    if not (folder / "config.json").is_file():
        raise SettingsError(
            f"{role} folder {path!r} has no config.json: point {role} at a checkpoint saved with save_pretrained "
            f"(e.g. the output of `gqa-convert convert`)"
        )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if role == "model" and not any((folder / f).is_file() for f in tokenizer_files):
        raise SettingsError(
            f"model folder {path!r} has no tokenizer (none of {', '.join(tokenizer_files)}): save the original "
            f"model's tokenizer there with AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({path!r})"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise SettingsError(f"{role} folder {path!r} has no weights (*.safetensors)")


def module_names(model: torch.nn.Module) -> set[str]:
    """Last components of every submodule name (`model.layers.0.self_attn.k_proj` -> `k_proj`)."""
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def check_modules(s: Settings, skeleton: torch.nn.Module) -> None:
    """The named K/V and LoRA modules exist in the model (checked on a weightless skeleton)."""
    present = module_names(skeleton)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
    wanted = {"kv_modules": s.kv_modules} if s.train in ("kv", "attention", "lora") else {}
    if s.train == "lora":
        wanted["lora_modules"] = s.lora_modules
    for key, names in wanted.items():
        missing = [n for n in names if n not in present]
        if missing:
            raise SettingsError(
                f"{key} names modules that do not exist in {s.model}: {', '.join(missing)}; "
                f"its linear layers are: {', '.join(linear)}"
            )


# ============================================================================================== run folder


def checkpoint_dir(s: Settings) -> Path:
    return Path(s.output_dir) / "checkpoints"


def complete_checkpoints(s: Settings) -> list[Path]:
    """Finished checkpoints, oldest first (a folder is renamed into place only once complete)."""
    root = checkpoint_dir(s)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def fingerprint(s: Settings, plan: dict) -> dict:
    run = {k: getattr(s, k) for k in RUN_KEYS}
    run.update({k: plan[k] for k in ("global_batch", "total_steps", "warmup_steps")})
    return run


def differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in current if saved.get(k) != current.get(k)]


def find_resume_point(s: Settings, run: dict) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; refuses another run's checkpoints."""
    checkpoints = complete_checkpoints(s)
    if s.resume not in ("never", "auto"):
        chosen = Path(s.resume)
        if not (chosen / "trainer_state.json").is_file():
            raise SettingsError(f"resume folder {s.resume!r} is not a complete checkpoint (no trainer_state.json)")
        candidates = [chosen]
    elif s.resume == "never":
        if checkpoints:
            raise SettingsError(
                f"output_dir {s.output_dir!r} holds another run's checkpoints ({checkpoints[-1].name}, ...): "
                f"set resume: auto to continue that run, or choose a new output_dir"
            )
        if (Path(s.output_dir) / "model").exists():
            raise SettingsError(f"output_dir {s.output_dir!r} already holds a finished run's model/: choose a new one")
        return None
    else:
        candidates = checkpoints[-1:]
    if not candidates:
        return None
    saved = json.loads((candidates[-1] / "trainer_state.json").read_text())["run"]
    changed = differences(saved, run)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise SettingsError(
            f"{candidates[-1]} holds a checkpoint of another run (settings differ: {shown}): "
            f"restore those settings to resume it, or choose a new output_dir"
        )
    return candidates[-1]


def discard(folder: Path) -> None:
    """Delete a folder by renaming it to `.tmp-` first: a kill inside the delete leaves debris that no reader
    takes for a checkpoint or a model (runs clear `.tmp-` folders), never a half folder under its real name."""
    if folder.exists():
        trash = folder.with_name(f".tmp-discard-{folder.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash)


@contextlib.contextmanager
def writing(what: str, s: Settings, *temporary: Path):
    """Turn a failed write into a WriteError that says what to do, after removing the half-written `temporary`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a short write as a RuntimeError
        for path in temporary:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        keep = complete_checkpoints(s)
        raise WriteError(
            f"cannot write {what} in {s.output_dir}: {e}. Nothing half-written was left under a final name; the "
            f"newest complete checkpoint is {keep[-1].name if keep else 'none'}. Free space (or lift the file-size "
            f"limit), then rerun with resume: auto"
        ) from None


def save_checkpoint(accelerator, s: Settings, step: int, trainer_state: dict, stream) -> Path:
    """`save_state` into a temporary folder, renamed into place when complete; keep the newest K."""
    root = checkpoint_dir(s)
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step:06d}", root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(f"checkpoint {final.name}", s, tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(f"checkpoint {final.name}", s, tmp):
            if stream is not None:  # the position in a streamed corpus (the same on every process)
                (tmp / "stream_state.json").write_text(json.dumps(stream.state()))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        discard(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(s)[: -s.keep_checkpoints]:
            discard(old)
    accelerator.wait_for_everyone()
    return final


# ============================================================================================== data


def load_documents(s: Settings, part: str):
    """The documents of the training or the validation part, as a fresh iterator each call."""
    separate = s.validation is not None or s.validation_split is not None
    if part == "validation" and separate:
        source = s.validation if s.validation is not None else s.data
        split = s.validation_split if s.validation_split is not None else s.data_split
    else:
        source, split = s.data, s.data_split

    def open_dataset():
        return textdata.load_text_dataset(
            source,
            config=s.data_config,
            split=split,
            text_column=s.text_column,
            streaming=s.streaming,
            txt_documents=s.txt_documents,
        )

    ds = open_dataset()

    def texts():
        stream = textdata.iter_texts(ds)
        if not separate:  # carve the held-out documents out of the training source
            stream = textdata.carve(stream, s.validation_fraction, part)
        return stream

    name = textdata.describe_source(source, s.data_config, split)
    if part == "validation" and not separate:
        name = f"{s.validation_fraction:g} of the documents of {name}, held out"
    return texts, name, open_dataset


def prepare_data(s: Settings, tokenizer) -> dict:
    """Training blocks (all in memory, or a stream), validation blocks, and what the plan reports about them."""
    eos = textdata.eos_token_id(tokenizer)
    train_texts, train_name, open_train = load_documents(s, "train")
    data = {"train_name": train_name, "eos": eos}
    if s.streaming:  # look at the first block only; training packs the stream as it goes
        tokens = textdata.tokenize_documents(train_texts(), tokenizer)
        first = next(textdata.pack_blocks(tokens, s.block_size, eos), None)
        if first is None:
            raise SettingsError(f"training data {train_name} holds fewer tokens than one block ({s.block_size})")
        separate = s.validation is not None or s.validation_split is not None
        data.update(
            train_blocks=None,
            open_train=open_train,
            train_tokens=None,
            holdout=0.0 if separate else s.validation_fraction,
        )
    else:
        docs = list(train_texts())
        if not docs:
            raise SettingsError(f"training data {train_name} holds no text")
        blocks = list(textdata.pack_blocks(textdata.tokenize_documents(docs, tokenizer), s.block_size, eos))
        if not blocks:
            tokens = textdata.count_tokens(docs, tokenizer)
            raise SettingsError(
                f"training data {train_name} holds {tokens} tokens, fewer than one block ({s.block_size}): "
                f"give more text or lower block_size"
            )
        data.update(train_blocks=torch.tensor(blocks, dtype=torch.long), train_documents=len(docs))
        data["train_tokens"] = data["train_blocks"].numel()

    use_validation = s.validation is not None or s.validation_split is not None or s.validation_fraction > 0
    data["val_blocks"] = None
    if use_validation:
        val_texts, val_name, _ = load_documents(s, "validation")
        stream = textdata.pack_blocks(textdata.tokenize_documents(val_texts(), tokenizer), s.block_size, eos)
        val = list(itertools.islice(stream, s.max_eval_blocks))
        if not val:
            raise SettingsError(
                f"validation data {val_name} (validation_fraction={s.validation_fraction}) holds fewer tokens than "
                f"one block ({s.block_size}): raise validation_fraction, give a validation source, or lower block_size"
            )
        data.update(val_blocks=torch.tensor(val, dtype=torch.long), val_name=val_name)
    return data


def global_batches(s: Settings, data: dict, global_batch: int, start_step: int):
    """Global batches of `global_batch` blocks from `start_step` on; the same on every process.

    In memory: each epoch visits the blocks in a permutation seeded by (seed, epoch), so the batch of a step
    depends on nothing but the step. Streaming: `data["stream"]`, a `PackedStream` (seeded shuffle buffer,
    packing on the fly) that a checkpoint stores the position of, so a resumed run reads on from there.
    """
    if data["train_blocks"] is not None:
        blocks = data["train_blocks"]
        n = len(blocks)
        orders: dict[int, torch.Tensor] = {}
        for step in itertools.count(start_step):
            rows = []
            for g in range(step * global_batch, (step + 1) * global_batch):
                epoch = g // n
                if epoch not in orders:
                    orders.clear()
                    orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 100_003 + epoch))
                rows.append(orders[epoch][g % n])
            yield blocks[torch.stack(rows)]
        return

    blocks = data["stream"].blocks()
    while True:
        yield torch.tensor([next(blocks) for _ in range(global_batch)], dtype=torch.long)


# ============================================================================================== math


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a packed block (every position but the last predicts the next token)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction
    )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """T^2 x KL(teacher || student) on temperature-softened distributions, per token."""
    s = torch.log_softmax(student.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) * temperature**2  # [B, T]
    return kl.mean() if reduction == "mean" else kl.sum()


def plan_budget(s: Settings, num_processes: int) -> dict:
    global_batch = s.micro_batch_size * s.grad_accum * num_processes
    tokens_per_step = global_batch * s.block_size
    if s.max_steps is not None:
        steps = s.max_steps
    else:
        wanted = s.tokens if s.tokens is not None else s.compute_fraction * s.pretraining_tokens
        steps = max(1, math.ceil(wanted / tokens_per_step))
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_ratio * steps)
    return {
        "global_batch": global_batch,
        "tokens_per_step": tokens_per_step,
        "total_steps": steps,
        "warmup_steps": min(warmup, steps),
        "tokens": steps * tokens_per_step,
        "num_processes": num_processes,
    }


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}Z{unit}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


# ============================================================================================== model


def choose_trainable(model: torch.nn.Module, s: Settings) -> torch.nn.Module:
    """Freeze what the scope does not train; for LoRA, wrap with peft (K/V projections via modules_to_save)."""
    if s.train == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=s.lora_r,
            lora_alpha=s.lora_alpha,
            lora_dropout=s.lora_dropout,
            target_modules=list(s.lora_modules),
            modules_to_save=list(s.kv_modules),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    if s.train == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in s.kv_modules:
            continue
        # kv: the K/V projections; attention: the whole module that holds them (q, k, v, o, ...)
        target = module if s.train == "kv" else model.get_submodule(name.rsplit(".", 1)[0])
        target.requires_grad_(True)
    return model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def evaluate(accelerator, model, teacher, blocks: torch.Tensor, batch_size: int, temperature: float) -> dict:
    """Validation loss (and KL to the teacher), each process scoring its share of the blocks."""
    model.eval()
    mine = blocks[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nll, tokens, kl
    for i in range(0, len(mine), batch_size):
        ids = mine[i : i + batch_size].to(accelerator.device)
        logits = model(input_ids=ids).logits
        totals[0] += lm_loss(logits, ids, "sum").double()
        totals[1] += ids[:, 1:].numel()
        if teacher is not None:
            with accelerator.autocast():
                t_logits = teacher(input_ids=ids).logits
            totals[2] += kd_loss(logits[:, :-1], t_logits[:, :-1], temperature, "sum").double()
    totals = accelerator.reduce(totals, "sum")
    model.train()
    out = {"val_loss": (totals[0] / totals[1]).item()}
    out["val_ppl"] = math.exp(min(out["val_loss"], 700))
    if teacher is not None:
        out["val_kl"] = (totals[2] / totals[1]).item()
    return out


# ============================================================================================== outputs


def read_rows(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line torn by a kill in the middle of its write is left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class Metrics:
    """metrics.jsonl (main process; flushed every row) and accelerate's trackers."""

    def __init__(self, accelerator, path: Path, resume_step: int | None):
        self.accelerator, self.path, self.rows = accelerator, path, []
        if accelerator.is_main_process:
            if resume_step is not None and path.is_file():  # drop what ran after the checkpoint
                self.rows = [r for r in read_rows(path) if r["step"] <= resume_step]
            tmp = path.with_name(f".tmp-{path.name}")  # replaced whole: a kill never leaves a half history
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            os.replace(tmp, path)

    def log(self, row: dict) -> None:
        scalars = {f"{row['kind']}/{k}": v for k, v in row.items() if isinstance(v, float)}
        self.accelerator.log(scalars, step=row["step"])
        if self.accelerator.is_main_process:
            self.rows.append(row)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in rows if r["kind"] == "train"]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(source_dir: str, summary: dict) -> str:
    """The input checkpoint's card (or a new one) with an uptraining section appended."""
    src = Path(source_dir) / "README.md"
    card = (
        src.read_text()
        if src.is_file()
        else (
            "---\nlibrary_name: transformers\ntags:\n- gqa-convert\n- uptrained\n---\n\n"
            f"# {Path(summary['settings']['output_dir']).name}\n\nConverted with gqa-convert, then uptrained.\n"
        )
    )
    s, first, last = summary["settings"], summary["initial_eval"], summary["final_eval"]
    alpha = (
        f"{summary['compute_fraction']:.3g} of {human(s['pretraining_tokens'])} pretraining tokens"
        if summary["compute_fraction"] is not None
        else "n/a (pretraining_tokens not given)"
    )
    teacher = (
        f"{s['teacher']} (KL weight {s['kd_weight']}, temperature {s['kd_temperature']})" if s["teacher"] else "none"
    )
    scope = s["train"] + (
        f" (LoRA r={s['lora_r']} on {', '.join(s['lora_modules'])}; {', '.join(s['kv_modules'])} trained fully; merged)"
        if s["train"] == "lora"
        else ""
    )
    rows = [
        ("input checkpoint", s["model"]),
        ("data", summary["data"]),
        (
            "tokens",
            f"{summary['tokens']:,} ({summary['steps']} steps x {summary['global_batch']} blocks x "
            f"{s['block_size']} tokens)",
        ),
        ("compute fraction alpha", alpha),
        ("trained", f"{scope}: {summary['trainable_params']:,} of {summary['total_params']:,} parameters"),
        ("teacher", teacher),
        (
            "optimizer",
            f"AdamW lr {s['lr']}, warmup {summary['warmup_steps']} steps, cosine to "
            f"{s['min_lr_ratio']} x lr, weight decay {s['weight_decay']}, clip {s['max_grad_norm']}",
        ),
        (
            "validation perplexity",
            (f"{first['val_ppl']:.3f} before -> {last['val_ppl']:.3f} after ({summary['validation']})")
            if last
            else "not measured",
        ),
        ("processes", str(summary["num_processes"])),
        ("wall time", duration(summary["train_seconds"])),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return card.rstrip() + "\n\n## Uptraining (gqa-convert)\n\n| | |\n|---|---|\n" + table + "\n"


def save_output(accelerator, model, s: Settings, tokenizer, summary: dict, rows: list[dict]) -> Path:
    """The final model as a plain checkpoint in output_dir/model, written to a temporary folder first."""
    from accelerate.utils import DistributedType
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(s.output_dir)
    final, tmp = out / "model", out / ".tmp-model"
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the shards)
    if accelerator.is_main_process:
        result = accelerator.unwrap_model(model)
        if accelerator.distributed_type == DistributedType.FSDP:  # the wrapped weights are shards: rebuild
            config = AutoConfig.from_pretrained(s.model)
            result = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, s.model_dtype))
            result.load_state_dict(state)
        if s.train == "lora":
            result = result.merge_and_unload()  # LoRA folded into the weights: a plain checkpoint
        result.requires_grad_(False)
        stored = AutoConfig.from_pretrained(s.model).dtype  # the input checkpoint's dtype
        save_dtype = s.save_dtype or str(stored or s.model_dtype).replace("torch.", "")
        result = result.to(getattr(torch, save_dtype))
        result.config.use_cache = True
        shutil.rmtree(tmp, ignore_errors=True)
        with writing("the final model", s, tmp, out / ".tmp-loss.png"):
            result.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for extra in Path(s.model).iterdir():  # what else the input carried (conversion report, licence, ...)
                weights = extra.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))
                if extra.is_file() and not weights and not (tmp / extra.name).exists() and extra.name != "README.md":
                    shutil.copy2(extra, tmp / extra.name)
            (tmp / "README.md").write_text(model_card(s.model, summary))
            (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2))
            plot_losses(rows, out / ".tmp-loss.png")
        os.replace(out / ".tmp-loss.png", out / "loss.png")
        discard(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def use_fsdp(accelerator) -> None:
    """FSDP on CPU processes: accelerate turns an FSDP launch into plain gloo data parallelism when no GPU is
    present, yet FSDP2 shards over gloo as well; switch the state to FSDP so that CPU runs test the GPU path."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # read from the launcher's environment, as accelerate does
        if plugin.fsdp_version != 2:
            raise SettingsError("FSDP on CPU processes needs fsdp_version: 2 (see recipes/accelerate_fsdp_cpu.yaml)")
        # both shared states: accelerate re-reads the partial one into the full one on later calls
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin


# ============================================================================================== main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        s, options = parse_args(argv)
        return run(s, options)
    except (SettingsError, textdata.DataError) as e:
        if is_rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, WriteError) as e:
        if is_rank0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        if is_rank0:  # a full disk outside the checkpoint and model writes (metrics, logs)
            print(
                f"error: {e}: free space (or lift the file-size limit), then rerun with resume: auto", file=sys.stderr
            )
        return 1


def run(s: Settings, options: dict) -> int:
    from accelerate.utils import get_int_from_env
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quiet = options["quiet"]
    is_rank0 = os.environ.get("RANK", "0") == "0"
    chatter = sys.stderr if options["json"] else sys.stdout

    def say(text: str) -> None:  # main process only; tqdm.write keeps the progress bar intact
        if is_rank0 and not quiet:
            tqdm.write(text, file=chatter)
            chatter.flush()

    # ---------------------------------------------------------------------- 1. check everything before compute
    check_settings(s)
    check_model_folder(s.model, "model")
    if s.teacher is not None:
        check_model_folder(s.teacher, "teacher")
    try:
        tokenizer = AutoTokenizer.from_pretrained(s.model)
        config = AutoConfig.from_pretrained(s.model)
    except Exception as e:
        raise SettingsError(f"cannot read the tokenizer or config in {s.model!r}: {e}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_modules(s, skeleton)
    total_params = count_params(skeleton)
    del skeleton
    teacher_params = 0
    if s.teacher is not None:
        teacher_config = AutoConfig.from_pretrained(s.teacher)
        if teacher_config.vocab_size != config.vocab_size:
            raise SettingsError(
                f"teacher vocabulary ({teacher_config.vocab_size}) differs from the model's ({config.vocab_size}): "
                f"the teacher must be the original of the converted model"
            )
        with torch.device("meta"):
            teacher_params = count_params(AutoModelForCausalLM.from_config(teacher_config))
    num_processes = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    plan = plan_budget(s, num_processes)
    run_id = fingerprint(s, plan)
    resume_from = find_resume_point(s, run_id)
    done = Path(s.output_dir) / "model" / "training_summary.json"
    if s.resume == "auto" and done.is_file() and json.loads(done.read_text()).get("run") == run_id:
        say(f"{s.output_dir}: this run is already complete (model/ written); nothing to do")
        if options["json"] and is_rank0:
            print(done.read_text())
        return 0
    data = prepare_data(s, tokenizer)
    data["tokenizer"] = tokenizer
    if data["val_blocks"] is not None and len(data["val_blocks"]) < num_processes:
        raise SettingsError(
            f"{len(data['val_blocks'])} validation blocks cannot be shared by {num_processes} processes: "
            f"raise max_eval_blocks or the validation data"
        )

    # ---------------------------------------------------------------------- 2. accelerate, model, optimizer
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, is_tensorboard_available, set_seed

    trackers = (
        []
        if s.report_to == "none"
        else (
            (["tensorboard"] if is_tensorboard_available() else []) if s.report_to == "auto" else s.report_to.split(",")
        )
    )
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=s.mixed_precision,
        gradient_accumulation_steps=s.grad_accum,
        step_scheduler_with_optimizer=False,  # the schedule is per optimizer step, whatever the process count
        log_with=trackers or None,
        project_dir=str(Path(s.output_dir) / "logs"),
    )
    assert accelerator.num_processes == num_processes, "WORLD_SIZE and accelerate disagree"
    use_fsdp(accelerator)
    set_seed(s.seed)
    if accelerator.is_main_process:
        Path(s.output_dir).mkdir(parents=True, exist_ok=True)
        # what a killed run was writing or deleting: checkpoints, the final model, metrics, the plot
        for leftover in [*checkpoint_dir(s).glob(".tmp-*"), *Path(s.output_dir).glob(".tmp-*")]:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    model = AutoModelForCausalLM.from_pretrained(s.model, dtype=getattr(torch, s.model_dtype))
    model.config.use_cache = False
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = choose_trainable(model, s)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    decay = [p for p in trainable if p.ndim >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(s.adam_beta1, s.adam_beta2),
        eps=s.adam_eps,
    )
    total, warmup = plan["total_steps"], plan["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, s.min_lr_ratio)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    teacher = None
    if s.teacher is not None:
        teacher = AutoModelForCausalLM.from_pretrained(s.teacher, dtype=getattr(torch, s.model_dtype))
        teacher.requires_grad_(False)
        teacher.eval()
        if accelerator.distributed_type == DistributedType.FSDP:
            teacher = accelerator.prepare_model(teacher, evaluation_mode=True)  # sharded like the student
        else:
            teacher = teacher.to(accelerator.device)

    start_step, previous_seconds = 0, 0.0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # model, optimizer, scheduler, RNG
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        start_step, previous_seconds = saved["step"], saved["train_seconds"]
    if s.streaming:
        saved_stream = resume_from / "stream_state.json" if resume_from is not None else None
        data["stream"] = textdata.PackedStream(
            data["open_train"],
            tokenizer,
            s.block_size,
            s.shuffle_buffer,
            s.seed,
            data["holdout"],
            state=json.loads(saved_stream.read_text()) if saved_stream is not None else None,
        )
    metrics = Metrics(accelerator, Path(s.output_dir) / "metrics.jsonl", start_step if resume_from else None)
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(s).items()}
    accelerator.init_trackers("uptrain", config=hparams)

    # ---------------------------------------------------------------------- 3. the plan
    tokens = plan["tokens"]
    alpha = tokens / s.pretraining_tokens if s.pretraining_tokens else None
    flops = 6 * total_params * tokens + 2 * teacher_params * tokens
    epochs = (
        f"{tokens / data['train_tokens']:.2f} epochs of {human(data['train_tokens'])} tokens"
        if data["train_tokens"]
        else "streaming"
    )
    say(f"uptrain {s.model} -> {s.output_dir}/model")
    say(
        f"  data        {data['train_name']} ({epochs}); validation {data.get('val_name', 'none')}"
        + (f", {len(data['val_blocks'])} blocks" if data["val_blocks"] is not None else "")
    )
    say(
        f"  trained     {s.train}: {trainable_params:,} of {total_params:,} parameters"
        + (f"; teacher {s.teacher} (kd_weight {s.kd_weight}, T {s.kd_temperature})" if teacher is not None else "")
    )
    say(
        f"  budget      {total} steps x {plan['global_batch']} blocks ({s.micro_batch_size} x {s.grad_accum} accum x "
        f"{num_processes} proc) x {s.block_size} tokens = {tokens:,} tokens"
        + (f" = alpha {alpha:.3g} of {human(s.pretraining_tokens)}" if alpha is not None else "")
    )
    say(
        f"  compute     ~{human(flops, 'FLOP')} (6 N D, N = {human(total_params)}"
        + (", + 2 N_teacher D" if teacher is not None else "")
        + ")"
        + f"; lr {s.lr}, warmup {warmup}, cosine to {s.min_lr_ratio} x lr"
    )
    if resume_from is not None:
        say(f"  resume      from {resume_from} (step {start_step}, {start_step * plan['tokens_per_step']:,} tokens)")

    # ---------------------------------------------------------------------- 4. train
    def trainer_state(step: int, seconds: float) -> dict:
        return {"step": step, "tokens": step * plan["tokens_per_step"], "train_seconds": seconds, "run": run_id}

    val_blocks = data["val_blocks"]
    if val_blocks is not None:
        val_blocks = val_blocks[: len(val_blocks) - len(val_blocks) % num_processes]
    eval_rows = [r for r in metrics.rows if r["kind"] == "eval"]

    def run_eval(step: int) -> None:
        if val_blocks is None:
            return
        result = evaluate(accelerator, model, teacher, val_blocks, s.micro_batch_size, s.kd_temperature)
        row = {"kind": "eval", "step": step, "tokens": step * plan["tokens_per_step"], **result}
        metrics.log(row)
        eval_rows.append(row)

    if resume_from is None:
        run_eval(0)
        if eval_rows:
            first = eval_rows[-1]
            say(f"  step 0      validation loss {first['val_loss']:.4f}, perplexity {first['val_ppl']:.3f}")

    fault_nan_at = int(os.environ.get("GQA_UPTRAIN_FAULT_NAN_AT", "0"))  # test hook: poison this step's loss
    step_delay = float(os.environ.get("GQA_UPTRAIN_STEP_DELAY", "0"))  # test hook: slow steps down
    bar = tqdm(
        total=total,
        initial=start_step,
        disable=quiet or not accelerator.is_main_process,
        unit="step",
        dynamic_ncols=True,
    )
    batches = global_batches(s, data, plan["global_batch"], start_step)
    rank, procs, mb = accelerator.process_index, num_processes, s.micro_batch_size
    session_start, measured_from, last_ckpt = time.time(), None, (resume_from.name if resume_from else None)
    for step in range(start_step + 1, total + 1):
        batch = next(batches)
        sums = torch.zeros(3, device=accelerator.device)  # loss, lm loss, kl
        for micro in range(s.grad_accum):
            first = (micro * procs + rank) * mb
            ids = batch[first : first + mb].to(accelerator.device)
            with accelerator.accumulate(model):
                logits = model(input_ids=ids).logits
                lm = lm_loss(logits, ids)
                loss, kl = lm, torch.zeros((), device=lm.device)
                if teacher is not None:
                    with torch.no_grad(), accelerator.autocast():
                        t_logits = teacher(input_ids=ids).logits
                    kl = kd_loss(logits[:, :-1], t_logits[:, :-1], s.kd_temperature)
                    loss = (1 - s.kd_weight) * lm + s.kd_weight * kl
                if step == fault_nan_at:
                    loss = loss * float("nan")
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and s.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach(), lm.detach(), kl.detach()]).float()
        scheduler.step()
        sums = accelerator.reduce(sums / s.grad_accum, "mean")
        step_loss, step_lm, step_kl = sums.tolist()
        norm = float(grad_norm) if grad_norm is not None else 0.0  # the same on every process
        if not math.isfinite(step_loss) or not math.isfinite(norm):
            bar.close()
            accelerator.end_training()
            keep = complete_checkpoints(s)
            what = f"the loss is {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm is {norm}"
            raise TrainingError(
                f"{what} at step {step}; stopped without saving. The last good checkpoint is "
                + (
                    f"{keep[-1]} (step {keep[-1].name[len(CHECKPOINT_PREFIX) :].lstrip('0') or 0}); "
                    f"rerun with resume: auto, after lowering lr or enabling clipping"
                    if keep
                    else "none"
                )
            )
        if step_delay:
            time.sleep(step_delay)
        now = time.time()
        if step == start_step + 1:
            measured_from = (now, step)  # the first step pays one-off costs; measure from its end
        elapsed_measured = now - measured_from[0]
        steps_measured = step - measured_from[1]
        tokens_per_s = steps_measured * plan["tokens_per_step"] / elapsed_measured if steps_measured else None
        row = {
            "kind": "train",
            "step": step,
            "tokens": step * plan["tokens_per_step"],
            "loss": step_loss,
            "lm_loss": step_lm,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_s,
        }
        if teacher is not None:
            row["kl"] = step_kl
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        metrics.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s or 0:.0f}", refresh=False)
        if steps_measured == 3:
            left = (total - step) * plan["tokens_per_step"] / tokens_per_s
            say(
                f"  measured    {tokens_per_s:,.0f} tokens/s over steps {step - 2}-{step}: {total - step} steps "
                f"left, about {duration(left)} of training (evaluations and checkpoints not counted)"
            )
        if (s.eval_every and step % s.eval_every == 0) or step == total:
            run_eval(step)
            if eval_rows and eval_rows[-1]["step"] == step:
                say(
                    f"  step {step:<6} validation loss {eval_rows[-1]['val_loss']:.4f}, "
                    f"perplexity {eval_rows[-1]['val_ppl']:.3f}"
                )
        if s.save_every and step % s.save_every == 0:
            seconds = previous_seconds + time.time() - session_start
            last_ckpt = save_checkpoint(accelerator, s, step, trainer_state(step, seconds), data.get("stream")).name
    bar.close()

    # ---------------------------------------------------------------------- 5. the result
    train_seconds = previous_seconds + time.time() - session_start
    all_evals = [r for r in metrics.rows if r["kind"] == "eval"] or eval_rows
    train_rows = [r for r in metrics.rows if r["kind"] == "train"]
    summary = {
        "model_dir": str(Path(s.output_dir) / "model"),
        "settings": dataclasses.asdict(s),
        "run": run_id,
        "data": data["train_name"],
        "validation": data.get("val_name"),
        "steps": total,
        "global_batch": plan["global_batch"],
        "warmup_steps": warmup,
        "tokens": tokens,
        "compute_fraction": alpha,
        "num_processes": num_processes,
        "total_params": total_params,
        "trainable_params": trainable_params,
        "teacher_params": teacher_params,
        "flops_estimate": flops,
        "train_seconds": train_seconds,
        "tokens_per_s": (tokens - start_step * plan["tokens_per_step"]) / max(time.time() - session_start, 1e-9),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "initial_eval": all_evals[0] if all_evals else None,
        "final_eval": all_evals[-1] if all_evals else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "last_checkpoint": last_ckpt,
    }
    final = save_output(accelerator, model, s, tokenizer, summary, metrics.rows)
    accelerator.end_training()
    if summary["final_eval"]:
        say(
            f"done: {final} (validation perplexity {summary['initial_eval']['val_ppl']:.3f} -> "
            f"{summary['final_eval']['val_ppl']:.3f}, {tokens:,} tokens, {duration(train_seconds)})"
        )
    else:
        say(f"done: {final} ({tokens:,} tokens, {duration(train_seconds)})")
    if options["json"] and accelerator.is_main_process:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
