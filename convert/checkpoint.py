"""Checkpoint folders in and out: resolve SOURCE, check everything before writing, stream the conversion into a
temporary folder beside OUTPUT, verify it, and only then rename it into place.

Memory stays flat: tensors are read one at a time with plain file reads, tensors the conversion does not touch are
copied inside the kernel on a background thread, and output shards are written with headers declared up front.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .core import check_groups, kv_cache_bytes_per_token, valid_groups
from .families import (
    QK_NORM_FAMILIES,
    ConversionError,
    Family,
    Shapes,
    family_for,
    shapes_for,
)
from .families_mha import modeling_template
from .output import (
    OutputLock,
    check_output,
    is_write_error,
    move_into_place,
    remove_stale_temp_folders,
    temp_folder,
    write_error,
)
from .planning import DTYPE_CHOICES, OutTensor, assign_shards, output_st, parse_size, plan_tensors
from .pooling import WEIGHT_ONLY_POOLS
from .report import PROVENANCE, Report, model_card, provenance
from .shipped import check_method, require_flag, ship_modeling_code, shipped_note
from .tensorio import (
    DTYPES,
    FLOATING,
    TensorInfo,
    fsync_path,
    nbytes,
    read_header,
    read_pickle_header,
    read_tensor,
    sync_folder,
)
from .writing import copy_side_files, numpy_layers, numpy_pool, torch_layers, verify_output, write_shards, write_text

if TYPE_CHECKING:  # torch loads on a background thread during a conversion (see Conversion.open)
    import torch

    from .methods import Method

# Names other modules and tests import from here.
__all__ = ["DTYPE_CHOICES", "PROVENANCE", "OutTensor", "Report", "assign_shards", "convert_checkpoint", "describe"]
_numpy_pool = numpy_pool

# Files worth taking from a hub repo or copying beside the converted weights (tokenizer, generation settings).
SIDE_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
]
SAFETENSORS_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PICKLE_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


@dataclass
class Source:
    """A checkpoint opened for reading: config, family, sizes, and where every tensor lives (no data read)."""

    folder: Path
    name: str  # hub id or folder, for the model card
    raw_config: dict
    family: Family
    shapes: Shapes
    tensors: dict[str, TensorInfo]
    pickle: bool = False
    trust_remote_code: bool = False
    _config: Any = None

    @property
    def config(self) -> Any:
        """transformers' config object, loaded on first use (importing it costs seconds the plain copy never pays)."""
        if self._config is None:
            self._config = load_config(self.folder, self.trust_remote_code)
        return self._config

    def get(self, key: str) -> "torch.Tensor":
        return read_tensor(self.tensors[key])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---------------------------------------------------------------------------------------------------------------
# Reading


def resolve_source(source: str | Path, revision: str | None = None, allow_pickle: bool = False) -> tuple[Path, str]:
    """A local folder as it is, or a hub id downloaded (config, tokenizer and weights only) into the hub cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"SOURCE {source} is a file: pass the folder that holds config.json")
        return path, str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise ConversionError(f"SOURCE {source} is neither an existing folder nor a hub id like 'org/model'")
    from huggingface_hub import snapshot_download

    patterns = SAFETENSORS_FILES + SIDE_FILES + (PICKLE_FILES if allow_pickle else [])
    try:
        folder = snapshot_download(str(source), revision=revision, allow_patterns=patterns)
    except Exception as e:  # huggingface_hub has many error types: offline, missing repo, gated, network
        hint = "it is not in the local hub cache" if os.environ.get("HF_HUB_OFFLINE") == "1" else "check the id"
        raise ConversionError(f"could not fetch {source} from the hub ({type(e).__name__}: {e}); {hint}")
    return Path(folder), str(source)


def _weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The weight shards of a folder, in index order; refuses pickle unless allowed."""
    for index_name, single, is_pickle in (
        ("model.safetensors.index.json", "model.safetensors", False),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", True),
    ):
        index, one = folder / index_name, folder / single
        if not index.exists() and not one.exists():
            continue
        if is_pickle and not allow_pickle:
            raise ConversionError(
                f"{folder} has only pickle weights ({single}), which can run code when loaded. Pass "
                "--allow-pickle to load them with torch.load(weights_only=True), or convert them to safetensors"
            )
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index} is not a valid shard index ({e}): re-download it")
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise ConversionError(
                    f"{index.name} names shard(s) that do not exist: {', '.join(missing)}. "
                    "The download is incomplete: fetch the missing files"
                )
            return [folder / f for f in files], is_pickle
        return [one], is_pickle
    raise ConversionError(f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {folder}: SOURCE must be a transformers model folder")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}): fix or re-download it")
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return raw


def load_config(folder: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError/TypeError/KeyError for bad fields
        raise ConversionError(f"{folder}/config.json could not be read by transformers ({type(e).__name__}: {e})")


def _plain_view(raw: dict, family: Family) -> SimpleNamespace | None:
    """config.json itself, when it states every size the shapes need; None sends the caller to transformers.

    A missing key would take the config class's default (gemma's head_dim is 256, phi's rotary factor 0.5), so
    only a complete config is read directly.
    """
    if hasattr(family, "config_view"):  # read with the stock config class, never with shipped code
        return family.config_view(raw)
    needed = ["num_attention_heads", "hidden_size", "num_hidden_layers", "head_dim", *family.config_keys]
    rope = raw.get("rope_parameters")
    if any(raw.get(k) is None for k in needed) or not (isinstance(rope, dict) or "partial_rotary_factor" in raw):
        return None
    if not all(
        isinstance(raw[k], int) and not isinstance(raw[k], bool) and raw[k] > 0
        for k in needed[:4] + [family.kv_key]
        if k in raw
    ):
        return None  # odd values: let transformers validate them and say what is wrong
    return SimpleNamespace(**raw)


def open_source(
    source: str | Path,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Source:
    """Resolve and open SOURCE; checks config, family, shard files and head counts against weight shapes."""
    folder, name = resolve_source(source, revision, allow_pickle)
    raw = read_config(folder)
    family = family_for(raw.get("model_type"))
    config = None
    view = _plain_view(raw, family)
    if view is None:
        config = view = load_config(folder, trust_remote_code)
    files, is_pickle = _weight_files(folder, allow_pickle)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos = read_pickle_header(f) if is_pickle else read_header(f)[0]
        tensors.update(infos)
    if hasattr(family, "for_keys"):  # tensor names with or without the base model's prefix
        family = family.for_keys(set(tensors))
    src = Source(folder, name, raw, family, shapes_for(family, view), tensors, is_pickle, trust_remote_code, config)
    _check_weights(src)
    return src


def _check_weights(src: Source) -> None:
    """Every layer has its attention tensors, each with as many numbers as the config implies (sizes only: the
    checkpoint is checked before torch has loaded)."""
    fam, s, present = src.family, src.shapes, set(src.tensors)
    for fragment, reason in fam.refuse.items():
        if any(fragment in k for k in present):
            raise ConversionError(f"unsupported checkpoint: {reason}")
    required = [fam.fused] if fam.layout != "split" else [fam.q, fam.k, fam.v]
    for layer in range(s.num_layers):
        keys = fam.attention_keys(layer, present)
        prefix = fam.prefix.format(i=layer)
        found = {k[len(prefix) :]: src.tensors[k].shape for k in keys}
        missing = [f"{n}.weight" for n in [*required, fam.o] if f"{n}.weight" not in found]
        wrong = [k for k, shape in found.items() if math.prod(shape) not in _allowed_numel(k, s, fam)]
        if missing or wrong:
            what = f"missing {', '.join(missing)}; " if missing else ""
            raise ConversionError(
                f"layer {layer}: the attention weights do not match config.json ({s.num_heads} heads, "
                f"{s.num_kv_heads} KV heads, head_dim {s.head_dim}, hidden {s.hidden}): {what}found "
                f"{found or 'none'}. The config and the weights disagree: fix config.json"
            )


def _allowed_numel(name: str, s: Shapes, fam: Family) -> set[int]:
    """How many numbers a layer tensor may hold given the config (a reshape alone would accept wrong sizes)."""
    H, Hkv, d, D = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden
    base, kind = name.rsplit(".", 1)
    if base == fam.o:
        return {D * H * d}
    if base in (fam.q_norm, fam.k_norm):  # shared by all heads ([d]) or one weight per head
        return {d, (H if base == fam.q_norm else Hkv) * d}
    rows = {fam.q: H * d, fam.k: Hkv * d, fam.v: Hkv * d, fam.fused: (H + 2 * Hkv) * d}[base]
    return {rows * (D if kind == "weight" else 1)}


# ---------------------------------------------------------------------------------------------------------------
# Converting, phase by phase


@dataclass(frozen=True)
class Settings:
    """The keyword options of `convert_checkpoint`."""

    dtype: str = "keep"
    revision: str | None = None
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    dry_run: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    progress: bool = True
    method_options: dict[str, Any] | None = None
    durable: bool = False
    write_modeling_code: bool = False


class Conversion:
    """One conversion of SOURCE into OUTPUT, in phases that run top to bottom (`run`):

    open    read SOURCE's config and shard headers (no tensor data); start torch loading when it will be needed;
            whether the output needs modeling code of its own (no stock class holds G KV heads)
    plan    every output tensor's dtype, shape and shard; whether numpy alone can do the merge
    check   OUTPUT: a usable path, room on disk, the lock beside it; then the temporary folder
    write   the shards, the config, tokenizer files, model card and provenance, all in the temporary folder
    verify  re-open the temporary folder as a checkpoint and compare it with the plan
    finish  (--fsync: put it on disk,) rename it to OUTPUT in one step

    Nothing outside the temporary folder and the lock file is written before `finish`; whatever fails, `clean_up`
    removes both and restores the torch thread count.
    """

    # Set by open and plan:
    src: Source
    template: Any  # the modeling code to ship with the output, or None: a stock transformers class loads it
    tensors: list[OutTensor]  # every output tensor, in layer order
    s_out: Shapes
    pool: Callable | None  # the numpy pooling function, or None: a torch method merges
    shards: list[list[OutTensor]]
    bytes_out: int

    def __init__(self, source: str | Path, output: str | Path, groups: int, method: str, settings: Settings) -> None:
        self.source, self.output, self.groups, self.method = source, Path(output), groups, method
        self.settings = settings
        self.options = settings.method_options or {}
        self.methods: Callable[[], Any] | None = None  # waits for convert.methods (and torch) to finish importing
        self.merger: Method | None = None
        self.report: Report | None = None
        self.lock: OutputLock | None = None
        self.tmp: Path | None = None
        self.threads: int | None = None  # torch's thread count before this run changed it

    def run(self) -> Report:
        self.open()
        self.plan()
        if self.settings.dry_run:
            rewrites = self.pool is None and self._load_merger().rewrites_queries
            return self._new_report(rewrites)
        try:
            self.check()
            self.write()
            self.verify()
            self.finish()
        except OSError as e:
            if not is_write_error(e, self.output):
                raise
            largest = max(sum(nbytes(t.st, t.shape) for t in shard) for shard in self.shards)
            raise write_error(e, self.output, self.bytes_out, largest) from e
        finally:
            self.clean_up()
        return self.report

    # --- open ----------------------------------------------------------------------------------------------------

    def open(self) -> None:
        s = self.settings
        if s.dtype not in DTYPE_CHOICES:
            raise ConversionError(f"--dtype {s.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        # Mean and first pooling of a plain checkpoint need no torch (see numpy_pool). Any other conversion starts
        # torch and the merge methods loading on a thread now, while the checkpoint is checked and planned from
        # its headers and the untouched tensors start copying: the import then costs no wall time of its own.
        if self.method not in WEIGHT_ONLY_POOLS or self.options:
            self.methods = _import_in_background("convert.methods")
        self.src = open_source(self.source, s.revision, s.allow_pickle, s.trust_remote_code)
        check_groups(self.groups, self.src.shapes)
        self.template = modeling_template(self.src.family, self.groups, self.src.shapes.num_heads)
        if self.template:
            what = f"{self.src.raw_config['model_type']} with {self.groups} KV heads"
            require_flag(self.template, s.write_modeling_code, what)
            check_method(self.template, self.method)

    # --- plan ----------------------------------------------------------------------------------------------------

    def plan(self) -> None:
        s = self.settings
        self.tensors, self.s_out = plan_tensors(self.src, self.groups, s.dtype)
        self.pool = numpy_pool(self.src, self.tensors, self.method, s.dtype, s.method_options)
        if self.pool is None and self.methods is None:
            self.methods = _import_in_background("convert.methods")
        self.shards = assign_shards(self.tensors, parse_size(s.max_shard_size))
        self.bytes_out = sum(nbytes(t.st, t.shape) for t in self.tensors)

    def _new_report(self, rewrites_queries: bool) -> Report:
        src, s_in, dtype = self.src, self.src.shapes, self.settings.dtype
        first_kv = src.family.attention_keys(0, set(src.tensors))[0]
        out_st = output_st(src.tensors[first_kv].st, dtype)  # the dtype the KV cache will have
        report = Report(
            source=src.name,
            output=str(self.output),
            model_type=src.raw_config["model_type"],
            method=self.method,
            num_heads=s_in.num_heads,
            kv_heads_before=s_in.num_kv_heads,
            kv_heads_after=self.groups,
            head_dim=s_in.head_dim,
            dtype=dtype,
            tensors_total=len(self.tensors),
            tensors_touched=[t.name for t in self.tensors if t.computed(rewrites_queries)],
            bytes_in=src.nbytes,
            bytes_out=self.bytes_out,
            shards_out=len(self.shards),
            kv_cache_bytes_per_token_before=kv_cache_bytes_per_token(s_in, s_in.num_kv_heads, out_st),
            kv_cache_bytes_per_token_after=kv_cache_bytes_per_token(s_in, self.groups, out_st),
            dry_run=self.settings.dry_run,
        )
        if self.template:
            report.notes.append(shipped_note(self.template))
        if src.family.cache_notes is not None:
            report.notes += src.family.cache_notes(s_in, s_in.num_kv_heads, self.groups, nbytes(out_st, ()))
        if src.raw_config["model_type"] in QK_NORM_FAMILIES:
            report.notes.append(
                "this family normalizes keys per head after the projection (q/k norm): merged keys are pooled "
                "before that norm, so the merge is approximate on the key side even when weights agree"
            )
        return report

    # --- check ---------------------------------------------------------------------------------------------------

    def check(self) -> None:
        """OUTPUT is checked before anything is created, then again under the lock (another run may have just
        finished it); only then are this host's dead runs' temporary folders removed and ours created."""
        s, output = self.settings, self.output
        check_output(self.src.folder, output, s.overwrite, self.bytes_out)
        output.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock(output).acquire()
        check_output(self.src.folder, output, s.overwrite, self.bytes_out)
        remove_stale_temp_folders(output)
        self.tmp = temp_folder(output)
        self.tmp.mkdir()

    # --- write ---------------------------------------------------------------------------------------------------

    def write(self) -> None:
        s, tmp = self.settings, self.tmp
        write_shards(self.shards, tmp, self._start_merging, s.progress, s.durable)
        raw = self.src.family.patch_config(self.src.raw_config, self.groups)
        if self.template:
            raw = ship_modeling_code(self.template, tmp, raw, self.groups)
        if s.dtype != "keep":
            raw["dtype"] = s.dtype
            raw.pop("torch_dtype", None)
        write_text(tmp / "config.json", json.dumps(raw, indent=2, sort_keys=True) + "\n")
        copy_side_files(self.src.folder, tmp, SIDE_FILES)
        write_text(tmp / "README.md", model_card(self.report, self.src.name))
        settings = {"seed": s.seed, "revision": s.revision, "max_shard_size": str(s.max_shard_size), **self.options}
        write_text(tmp / PROVENANCE, json.dumps(provenance(self.report, settings), indent=2) + "\n")
        if self.merger is not None:
            self.merger.finish(tmp, self.report)

    def _start_merging(self) -> tuple[Callable[[int], dict], bool]:
        """Called by write_shards once the pass-through copies are under way: the merge of one layer, and whether
        it rewrites queries and outputs too. A torch method waits here for the import started in `open`."""
        if self.pool is not None:
            self.report = self._new_report(rewrites_queries=False)
            return numpy_layers(self.src, self.tensors, self.pool, self.groups, self.report), False
        import torch

        merger = self.merger = self._load_merger()
        if not merger.needs_calibration:
            # Weight-only merges are a few small, memory-bound ops per layer: one torch thread leaves the other
            # core to the copier (two made the merge twice as slow on 2 cores). Restored by clean_up.
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
        self.report = self._new_report(merger.rewrites_queries)
        context = merger.layer_contexts(self.src, self.groups, self.settings.seed, **self.options)
        compute = torch_layers(self.src, self.tensors, merger, self.s_out, self.settings.seed, context, self.report)
        return compute, merger.rewrites_queries

    def _load_merger(self) -> "Method":
        return _load_method(self.methods(), self.method, self.settings.method_options)

    # --- verify --------------------------------------------------------------------------------------------------

    def verify(self) -> None:
        verify_output(self.tmp, self.src, {t.name: t.shape for t in self.tensors}, self.groups)

    # --- finish --------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        if self.settings.durable:
            sync_folder(self.tmp)
        move_into_place(self.tmp, self.output)
        if self.settings.durable:
            fsync_path(self.output.parent)  # the rename itself

    def clean_up(self) -> None:
        """Runs whatever happened: the temporary folder (gone already after a successful finish), the lock, and
        torch's thread count."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
            self.threads = None


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    num_kv_heads: int,
    method: str = "mean",
    *,
    dtype: str = "keep",
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    progress: bool = True,
    method_options: dict[str, Any] | None = None,
    durable: bool = False,
    write_modeling_code: bool = False,
) -> Report:
    """Convert the checkpoint at SOURCE (folder or hub id) to `num_kv_heads` KV heads, written at OUTPUT.

    The checkpoint and OUTPUT are checked before anything is written; OUTPUT appears only when complete and
    verified; SOURCE is never modified. A killed process leaves no OUTPUT (or the one it was replacing); `durable`
    (--fsync) also covers a power loss: every file is on disk before the rename (what `cp` and `save_pretrained`
    do not wait for).
    """
    settings = Settings(
        dtype=dtype,
        revision=revision,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        seed=seed,
        progress=progress,
        method_options=method_options,
        durable=durable,
        write_modeling_code=write_modeling_code,
    )
    return Conversion(source, output, num_kv_heads, method, settings).run()


def _import_in_background(module: str) -> Callable[[], Any]:
    """Start importing `module` on a thread (torch takes about a second); the returned function waits for it and
    returns the module, or raises what the import raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["module"] = importlib.import_module(module)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="gqa-import", daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["module"]

    return wait


def _load_method(methods: Any, name: str, options: dict[str, Any] | None) -> "Method":
    merger = methods.get_method(name)
    if options and not merger.needs_calibration:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        calibrated = ", ".join(n for n, m in methods.METHODS.items() if m.needs_calibration)
        raise ConversionError(
            f"{flags}: only for calibrated methods ({calibrated}); --method {name} reads the weights alone"
        )
    return merger


def describe(source: str | Path, revision: str | None = None, allow_pickle: bool = False) -> dict:
    """What `gqa-convert inspect` prints: family, heads, head_dim, valid G and KV-cache bytes per token for each."""
    src = open_source(source, revision, allow_pickle)
    s = src.shapes
    st = next((t.st for t in src.tensors.values() if t.st in FLOATING), "F32")
    notes = src.family.cache_notes(s, s.num_kv_heads, s.num_kv_heads, nbytes(st, ())) if src.family.cache_notes else []
    return {
        "source": src.name,
        "model_type": src.raw_config["model_type"],
        "layers": s.num_layers,
        "hidden_size": s.hidden,
        "num_heads": s.num_heads,
        "num_kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "rotary_dim": s.rotary_dim,
        "dtype": DTYPES[st][0],
        "parameters": sum(math.prod(t.shape) for t in src.tensors.values()),
        "valid_num_kv_heads": {g: kv_cache_bytes_per_token(s, g, st) for g in valid_groups(s)},
        # G -> how the output of that G loads, where it needs shipped modeling code (--write-modeling-code)
        "shipped_code": {
            g: shipped_note(t) for g in valid_groups(s) if (t := modeling_template(src.family, g, s.num_heads))
        },
        "notes": notes,
    }
