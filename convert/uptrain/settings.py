"""The settings of an uptraining run, declared once: types, defaults, bounds and cross-field rules in one model.

Why pydantic (v2): it ships with the transformers stack this project already installs, and one declared model gives
what the run needs without a second copy anywhere: coercion of YAML values and `key=value` strings into the
declared types, bounds per field (`Field(gt=0)`), rules across fields (`model_validator`), unknown keys refused
(`extra="forbid"`), and a list of every problem at once. A dataclass would need a hand-written coercer and checker
beside it; attrs/cattrs would add a dependency. `_explain` turns pydantic's errors into one line per problem that
names the key and the fix, so a user never sees a pydantic traceback.

Adding a setting: one annotated field below (a bound in `Field`, a rule in `_rules`), one row in
recipes/README.md, and, when it changes what a run computes, its name in `RUN_KEYS`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from convert.errors import SettingsError, SpanCorruptionError
from convert.text import sources as textdata
from convert.text.span_corruption import SpanCorruption

CONFIG_DIR = Path(__file__).parent / "configs"  # the example configs, shipped with the package


def _none_word(value: Any) -> Any:
    """`null`, `none` or `~` typed on the command line mean no value."""
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~", ""):
        return None
    return value


def _whole(value: Any) -> Any:
    """Counts may be written as `1e9` or `2.0`: accepted when whole, refused (by the int check) otherwise."""
    value = _none_word(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def _names(value: Any) -> Any:
    """A list of names: a YAML list, `[a,b]` or `a,b` from the command line."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                return value
        return [v for v in text.split(",") if v]
    if isinstance(value, list):
        return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    return value


def _sources(value: Any) -> Any:
    """One source or a list of them (a string starting with `[` is a list); a list of mappings is a mixture."""
    value = _none_word(value)
    if isinstance(value, str) and value.startswith("["):
        value = _names(value)
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        from convert.uptrain.mixture import check_entries

        entries = check_entries(value)
        if isinstance(entries, str):
            raise PydanticCustomError("setting", entries)
        return entries
    return _names(value) if isinstance(value, list) else value


def _precision(value: Any) -> Any:
    return "no" if value is False else _none_word(value)  # YAML reads a bare `no` as false


Count = Annotated[int, BeforeValidator(_whole)]
MaybeCount = Annotated[int | None, BeforeValidator(_whole)]
MaybeFloat = Annotated[float | None, BeforeValidator(_none_word)]
MaybeStr = Annotated[str | None, BeforeValidator(_none_word)]
Names = Annotated[list[str], BeforeValidator(_names)]
Dtype = Literal["float32", "bfloat16", "float16"]
Unit = Annotated[float, Field(ge=0, le=1)]


class Settings(BaseModel):
    """Everything an uptraining run reads; recipes/README.md explains each key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    # --- model and what is trained
    model: str  # converted checkpoint folder: config.json, weights, tokenizer
    output_dir: str
    train: Literal["full", "attention", "kv", "lora"] = "full"  # full is the paper
    kv_modules: Names = ["k_proj", "v_proj"]  # names of the K/V projections
    lora_modules: Names = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_r: Count = 16
    lora_alpha: float = 32.0
    lora_dropout: float = Field(0.0, ge=0)
    model_dtype: Dtype = "float32"  # dtype of the trained weights (use mixed_precision for bf16 compute)
    save_dtype: Annotated[Dtype | None, BeforeValidator(_none_word)] = None  # default: the input checkpoint's
    mixed_precision: Annotated[Literal["no", "bf16", "fp16"] | None, BeforeValidator(_precision)] = None
    gradient_checkpointing: bool = False
    fsdp_wrap: Names = []  # FSDP's unit: block class names; empty = the model's own (_no_split_modules)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    torch_compile: bool = False  # torch.compile the model (inductor) through accelerate
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw is fused where the device supports it
    peak_tflops: Annotated[MaybeFloat, Field(gt=0)] = None  # one device's peak, for MFU; default: known GPUs
    trust_remote_code: bool = False  # run the Python code a model folder ships (config.json `auto_map`)
    # --- data
    # local files (globs ok) or a hub dataset name; or a mixture: [{source, weight, config, split, text_column}]
    data: Annotated[str | list[str] | list[dict[str, Any]], BeforeValidator(_sources)]
    num_workers: Count = Field(1, ge=0)  # DataLoader workers per process preparing batches (0: the training thread)
    data_cache: MaybeStr = None  # the token cache of in-memory corpora (default: ~/.cache/gqa-convert/tokens)
    data_config: MaybeStr = None
    data_split: str = "train"
    text_column: str = "text"
    txt_documents: Literal[textdata.TXT_MODES] = "auto"  # see convert/text/sources.py
    streaming: bool = False  # read the corpus lazily (larger than memory or disk)
    shuffle_buffer: Count = Field(10_000, gt=0)  # documents in the streaming shuffle buffer
    validation: Annotated[str | list[str] | None, BeforeValidator(_sources)] = None  # default: `data` itself
    validation_split: MaybeStr = None
    validation_fraction: float = Field(0.05, ge=0, lt=1)  # without validation/validation_split: carved out
    max_eval_blocks: Count = Field(32, gt=0)
    block_size: Count = Field(512, ge=2)  # causal_lm: tokens per block; span_corruption: encoder input length
    # --- objective: next-token prediction (decoder-only) or T5's span corruption (encoder-decoder)
    objective: Literal["causal_lm", "span_corruption"] = "causal_lm"
    noise_density: float = Field(0.15, gt=0, lt=1)  # span_corruption: share of tokens hidden
    mean_span_length: float = Field(3.0, ge=1)  # span_corruption: mean length of a hidden span
    micro_batch_size: Count = Field(4, gt=0)  # blocks per process per forward pass
    grad_accum: Count = Field(1, gt=0)  # global batch = micro_batch_size x grad_accum x processes blocks
    seed: Count = 0
    # --- budget: exactly one of max_steps, tokens, compute_fraction (with pretraining_tokens)
    max_steps: Annotated[MaybeCount, Field(gt=0)] = None
    tokens: Annotated[MaybeCount, Field(gt=0)] = None
    compute_fraction: Annotated[MaybeFloat, Field(gt=0)] = None  # alpha: tokens = alpha x pretraining_tokens
    pretraining_tokens: Annotated[MaybeCount, Field(gt=0)] = None  # also reports alpha
    # a wall-clock cap on top of the budget: stop after the first step that ends past it, but not before min_steps
    max_seconds: Annotated[MaybeFloat, Field(gt=0)] = None
    min_steps: Count = Field(1, gt=0)
    # --- optimisation: AdamW, linear warmup, cosine decay to min_lr_ratio x lr
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: Unit = 0.1
    warmup_steps: Annotated[MaybeCount, Field(ge=0)] = None  # default: warmup_ratio x steps
    warmup_ratio: Unit = 0.05
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    # --- distillation from the original model (beyond the paper)
    teacher: MaybeStr = None
    kd_weight: Unit = 0.5  # loss = (1 - kd_weight) x LM + kd_weight x T^2 x KL(teacher || student)
    kd_temperature: float = Field(1.0, gt=0)
    # --- evaluation, checkpoints, logging
    eval_every: Count = Field(50, ge=0)  # steps; 0 = only at the start and the end
    save_every: Count = Field(100, ge=0)  # steps; 0 = no periodic checkpoints
    keep_checkpoints: Count = Field(2, gt=0)
    resume: str = "never"  # never | auto (newest complete checkpoint in output_dir) | a checkpoint folder
    report_to: str = "auto"  # auto (tensorboard when installed) | none | tensorboard | wandb | ... (comma list)
    # --- publishing (convert/hub/publish.py): model/ uploaded once the run is complete; the token checked first
    push_to_hub: MaybeStr = None  # a hub repository, `org/name` or `name`
    hub_private: bool = True  # a repository the push creates is private; an existing one keeps its visibility

    @field_validator("model", "output_dir", "data")
    @classmethod
    def _given(cls, value: Any, info) -> Any:
        if not value:
            raise PydanticCustomError("setting", f"{info.field_name} is not set")
        return value

    @field_validator("compute_fraction")
    @classmethod
    def _alpha(cls, value: float | None) -> float | None:
        if value is not None and value > 1:
            raise PydanticCustomError(
                "setting",
                f"compute_fraction is alpha, a fraction of the pretraining tokens (0 < alpha <= 1), got {value}: "
                f"for 5% write 0.05",
            )
        return value

    @model_validator(mode="after")
    def _rules(self) -> Settings:
        problems = []
        budgets = [k for k in ("max_steps", "tokens", "compute_fraction") if getattr(self, k) is not None]
        if len(budgets) != 1:
            problems.append(
                "give exactly one budget: max_steps, tokens, or compute_fraction (alpha, with pretraining_tokens)"
                + (f"; got {', '.join(budgets)}" if budgets else "")
            )
        if self.compute_fraction is not None and self.pretraining_tokens is None:
            problems.append("compute_fraction needs pretraining_tokens (the tokens the original model saw)")
        if self.train == "lora" and self.lora_r <= 0:
            problems.append(f"lora_r must be positive, got {self.lora_r}")
        if self.train != "full" and not self.kv_modules:
            problems.append(f"train={self.train} needs kv_modules (the K/V projection names, e.g. [k_proj, v_proj])")
        if self.train == "lora":
            if not self.lora_modules:
                problems.append("train=lora needs lora_modules (e.g. [q_proj, o_proj])")
            both = sorted(set(self.lora_modules) & set(self.kv_modules))
            if both:
                problems.append(f"{', '.join(both)} cannot be both a LoRA target and fully trained (kv_modules)")
        if self.objective == "span_corruption":
            problems.extend(_span_problems(self))
        if self.resume not in ("never", "auto") and not Path(self.resume).is_dir():
            problems.append(f"resume must be never, auto or a checkpoint folder; {self.resume!r} is not a folder")
        if problems:
            raise _Problems(problems)
        return self

    @property
    def span_corruption(self):
        """The objective's settings (`convert.text.span_corruption.SpanCorruption`); block_size is the input length."""

        return SpanCorruption(self.noise_density, self.mean_span_length, self.block_size)

    @property
    def block_tokens(self) -> int:
        """Tokens one training row costs in the budget: a block, or an example's inputs plus its targets."""
        if self.objective == "causal_lm":
            return self.block_size
        span = self.span_corruption
        return span.input_length + span.target_length


def _span_problems(s: Settings) -> list[str]:
    """What span corruption cannot do with these settings (lengths that no run fills, streaming)."""

    problems = []
    try:
        _ = s.span_corruption.raw_length
    except SpanCorruptionError as e:
        problems.append(f"objective=span_corruption: {str(e).replace('input_length', 'block_size')}")
    if s.streaming:
        problems.append("objective=span_corruption reads the corpus into memory: set streaming=false")
    if isinstance(s.data, list) and s.data and isinstance(s.data[0], dict) and len(s.data) > 1:
        problems.append("objective=span_corruption takes one source, not a mixture: give data one source")
    return problems


# Settings that decide the trajectory of a run: a checkpoint resumes only under the same values
# (plus the derived global batch, steps and warmup steps).
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
)
STREAM_KEYS = ("num_workers",)  # in the fingerprint of streaming runs only: a stream is split per worker
SPAN_KEYS = ("objective", "noise_density", "mean_span_length")  # in the fingerprint of span-corruption runs only
# In the fingerprint only when changed from these defaults, so that older checkpoints still resume.
OPTIONAL_RUN_KEYS = {"optimizer": "adamw", "attn_implementation": "sdpa"}


class _Problems(ValueError):
    """Several cross-field problems, raised together from the model validator."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _bounds(key: str) -> str:
    """The allowed range of a numeric field, in words, from its declared bounds."""
    limits: dict[str, float] = {}
    for meta in Settings.model_fields[key].metadata:
        for name in ("gt", "ge", "lt", "le"):
            if getattr(meta, name, None) is not None:
                limits[name] = getattr(meta, name)
    low = limits.get("gt", limits.get("ge"))
    high = limits.get("lt", limits.get("le"))
    if high is not None:
        return f"in {'(' if 'gt' in limits else '['}{low:g}, {high:g}{')' if 'lt' in limits else ']'}"
    if "gt" in limits and low == 0:
        return "positive"
    if low == 0:
        return "not negative"
    return f"at least {low:g}"


def _explain(error: ValidationError) -> list[str]:
    """One line per problem, naming the key and what it accepts."""
    fields = list(Settings.model_fields)
    lines = []
    for e in error.errors():
        key = str(e["loc"][0]) if e["loc"] else ""
        kind, got = e["type"], e.get("input")
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(key, fields, n=1)
            lines.append(f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif kind == "missing":
            lines.append(f"{key} is not set")
        elif kind == "setting":
            lines.append(e["msg"])
        elif kind == "value_error" and isinstance(e.get("ctx", {}).get("error"), _Problems):
            lines.extend(e["ctx"]["error"].problems)
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            lines.append(f"{key} must be {_bounds(key)}, got {got}")
        elif kind.startswith("int_"):
            lines.append(f"{key} must be a whole number, got {got!r}")
        elif kind.startswith("float_"):
            lines.append(f"{key} must be a number, got {got!r}")
        elif kind.startswith("bool_"):
            lines.append(f"{key} must be true or false, got {got!r}")
        elif kind == "literal_error":
            allowed = ", ".join(str(v) for v in _literal_values(key))
            lines.append(f"{key} must be one of {allowed}, got {got!r}")
        elif kind.startswith("list_"):
            lines.append(f"{key} must be a list of names, got {got!r}")
        elif kind.startswith("string_"):
            lines.append(f"{key} must be a string, got {got!r} (quote it in YAML)")
        else:
            lines.append(f"{key}: {e['msg']}, got {got!r}")
    return list(dict.fromkeys(lines))  # a union type reports one problem once per member


def _literal_values(key: str) -> list[Any]:
    """The values a Literal field (possibly inside Optional/Annotated) accepts."""

    def walk(hint) -> list[Any]:
        if get_origin(hint) is Literal:
            return list(get_args(hint))
        return [v for arg in get_args(hint) for v in walk(arg)]

    return walk(Settings.model_fields[key].annotation)


def make_settings(values: dict[str, Any]) -> Settings:
    """Settings from a mapping (YAML or code); every problem at once in one SettingsError."""
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = _explain(e)
    if len(problems) == 1:
        raise SettingsError(problems[0])
    raise SettingsError("bad settings:\n  - " + "\n  - ".join(problems))


def config_path(name: str) -> Path:
    """A YAML file, or the name of a shipped example config (`smollm2-mqa-cpu`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise SettingsError(f"config file {name!r} does not exist (shipped configs: {known})")


def read_config(name: str) -> dict[str, Any]:
    path = config_path(name)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"config file {name!r} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise SettingsError(f"config file {name!r} must hold a mapping of settings")
    return loaded


@dataclass
class Options:
    """How a run talks, not what it computes."""

    quiet: bool = False  # no progress bar, no chatter
    json: bool = False  # the training summary as JSON on stdout (the chatter goes to stderr)


USAGE = """usage: accelerate launch [accelerate options] recipes/uptrain.py CONFIG.yaml [key=value | --key value ...]
       gqa-convert uptrain CONFIG.yaml [...]    python -m convert.uptrain CONFIG.yaml [...]
       [--quiet] [--json]; CONFIG is a YAML file or a shipped config name ({configs})
Settings (defaults in parentheses); see recipes/README.md:
"""


def usage() -> str:
    configs = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    rows = []
    for name, f in Settings.model_fields.items():
        rows.append(f"  {name} ({'required' if f.is_required() else repr(f.get_default(call_default_factory=True))})")
    return USAGE.format(configs=configs) + "\n".join(rows)


def load_settings(argv: list[str]) -> tuple[Settings, Options]:
    """Settings from `CONFIG.yaml` (or a shipped config name) plus `key=value` / `--key value` overrides."""
    options = Options()
    config, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage())
            raise SystemExit(0)
        if arg in ("--quiet", "-q"):
            options.quiet = True
        elif arg == "--json":
            options.json = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise SettingsError("--config needs a file")
            config, i = argv[i + 1], i + 1
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
        elif config is None:
            config = arg
        else:
            raise SettingsError(f"unexpected argument {arg!r}: give CONFIG.yaml, then key=value or --key value")
        i += 1
    values = read_config(config) if config is not None else {}
    values.update(overrides)
    return make_settings(values), options
