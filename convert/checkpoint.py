"""Checkpoint folders in and out: resolve SOURCE, check everything before writing, stream the conversion into a
temporary folder beside OUTPUT, verify it, and only then rename it into place.

Memory stays flat: tensors are read one at a time with plain file reads, tensors the conversion does not touch are
copied inside the kernel on a background thread, and output shards are written with headers declared up front.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from . import __version__
from .core import check_groups, convert_layer, kv_cache_bytes_per_token, valid_groups
from .families import (
    QK_NORM_FAMILIES,
    ConversionError,
    Family,
    Shapes,
    family_for,
    output_shapes,
    shapes_for,
)
from .methods import array_pool, method_module
from .pooling import relative_error
from .tensorio import (
    DTYPES,
    FLOATING,
    NUMPY_FLOATS,
    Copier,
    ShardWriter,
    TensorInfo,
    float32_to,
    fsync_path,
    nbytes,
    read_float32,
    read_header,
    read_pickle_header,
    read_tensor,
    st_dtype,
    sync_folder,
    tensor_bytes,
    torch_dtype,
)

if TYPE_CHECKING:  # torch loads on a background thread during a conversion (see convert_checkpoint)
    import numpy as np
    import torch

    from .methods import Method

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
PROVENANCE = "gqa_convert.json"
DTYPE_CHOICES = ("keep", "float32", "float16", "bfloat16")


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


@dataclass
class Report:
    """What a conversion did (or, with dry_run, would do)."""

    source: str
    output: str
    model_type: str
    method: str
    num_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    dtype: str
    tensors_total: int
    tensors_touched: list[str]
    bytes_in: int
    bytes_out: int
    shards_out: int
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    dry_run: bool
    per_layer: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


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
# Planning


@dataclass
class OutTensor:
    name: str
    st: str  # safetensors dtype of the output ("BF16", ...)
    shape: tuple[int, ...]
    source: TensorInfo  # the tensor it comes from (same name)
    layer: int | None  # the layer whose merge may produce it (its attention tensors); None: passes through

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtype(self.st)

    @property
    def verbatim(self) -> bool:
        """Same bytes as the source whatever the method: copied raw (shape and dtype kept, not a pickle)."""
        return self.shape == self.source.shape and self.st == self.source.st and self.source.offset >= 0

    def computed(self, rewrites_queries: bool) -> bool:
        """Whether the merge writes it: every attention tensor for methods that rewrite q/o, else only K/V-sized
        ones (their shape changes); q/o then pass through byte for byte, never read."""
        return self.layer is not None and (rewrites_queries or self.shape != self.source.shape)


def natural_key(name: str) -> list:
    """model.layers.2 before model.layers.10, so layers are converted in order, one at a time."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m:
        raise ConversionError(f"--max-shard-size {size!r} is not a size like 5GB, 500MB or 2GiB")
    unit = m.group(2).rstrip("B") or ""
    scale = {
        "": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    return int(float(m.group(1)) * scale)


def output_st(st: str, dtype: str) -> str:
    """The safetensors dtype a tensor gets with --dtype (integers and dtype 'keep' stay as they are)."""
    return st if dtype == "keep" or st not in FLOATING else st_dtype(dtype)


def plan_tensors(src: Source, groups: int, dtype: str) -> tuple[list[OutTensor], Shapes]:
    """Every output tensor with its dtype and shape, in layer order, from sizes alone: before any data is read,
    and before torch has loaded. Attention tensors carry their layer; whether the merge rewrites them or they
    pass through depends on the method (`OutTensor.computed`)."""
    fam, s_in = src.family, src.shapes
    s_out = output_shapes(s_in, groups, src.raw_config, fam)
    present = set(src.tensors)
    planned: dict[str, tuple[int, tuple[int, ...]]] = {}
    for layer in range(s_in.num_layers):
        keys = fam.attention_keys(layer, present)
        shapes = fam.planned_shapes(layer, {k: src.tensors[k].shape for k in keys}, s_in, s_out)
        planned.update({k: (layer, shape) for k, shape in shapes.items()})
    plan = []
    for name in sorted(src.tensors, key=natural_key):
        info = src.tensors[name]
        layer, shape = planned.get(name, (None, info.shape))
        plan.append(OutTensor(name, output_st(info.st, dtype), shape, info, layer))
    return plan, s_out


def assign_shards(plan: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in plan:
        n = nbytes(t.st, t.shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_folder(output: Path) -> Path:
    """`.NAME.gqa-tmp-PID` beside OUTPUT; leftovers of killed runs (dead PIDs) are removed first."""
    for stale in output.parent.glob(f".{output.name}.gqa-tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return output.parent / f".{output.name}.gqa-tmp-{os.getpid()}"


def check_output(src_folder: Path, output: Path, overwrite: bool, needed_bytes: int) -> None:
    """Refuse outputs that would lose data: inside SOURCE, non-empty without --overwrite, or no room on disk."""
    out, srcp = output.resolve(), src_folder.resolve()
    if out == srcp or srcp in out.parents:
        raise ConversionError(f"OUTPUT {output} is inside SOURCE {src_folder}: choose a folder outside it")
    if out in srcp.parents:
        raise ConversionError(f"OUTPUT {output} contains SOURCE {src_folder}: choose another folder")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"OUTPUT {output} is a file: choose a folder path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"OUTPUT {output} exists and is not empty: pass --overwrite to replace it")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes + (64 << 20):
        raise ConversionError(
            f"not enough free disk space at {parent}: need {needed_bytes / 1e9:.2f} GB, have {free / 1e9:.2f} GB"
        )


def _write_shards(
    src: Source,
    shards: list[list[OutTensor]],
    folder: Path,
    start_merging: Callable[[], tuple[Callable[[int], dict[str, "np.ndarray"]], bool]],
    progress: bool,
    durable: bool = False,
) -> dict[str, str]:
    """Stream every output tensor into its shard; returns the weight map.

    First every tensor that no method changes (outside attention, same dtype) is handed to the copier thread.
    Only then does `start_merging` wait for torch and the merge method, which load on a thread of their own
    meanwhile (unless the merge needs no torch), and return (compute_layer, rewrites_queries); the attention
    tensors follow, layer by layer. compute_layer gives each rewritten tensor's bytes, in its output dtype.
    """
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(nbytes(t.st, t.shape) for shard in shards for t in shard)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress)
    weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
    writers: list[ShardWriter] = []
    try:
        with Copier() as copier:  # pass-through copies run beside the import and the merging, on a second thread
            for shard, name in zip(shards, names):
                entries = [(t.name, t.st, t.shape) for t in shard]
                writers.append(ShardWriter(folder / name, entries, {"format": "pt"}, copier, durable))
            early = set()
            for shard, writer in zip(shards, writers):
                for t in shard:
                    if t.layer is None and t.verbatim:
                        writer.write_raw(t.name, t.source, done=lambda n=t.source.nbytes: bar.update(n))
                        early.add(t.name)
            compute_layer, rewrites_queries = start_merging()
            cache: dict[str, np.ndarray] = {}  # computed tensors of the current layer, dropped once written
            for shard, writer in zip(shards, writers):
                for t in shard:
                    if t.name in early:
                        continue
                    size = nbytes(t.st, t.shape)
                    if t.computed(rewrites_queries):
                        if t.name not in cache:
                            cache = compute_layer(t.layer)
                        writer.write(t.name, cache.pop(t.name))
                        bar.update(size)
                    elif t.verbatim:
                        writer.write_raw(t.name, t.source, done=lambda n=size: bar.update(n))  # byte for byte
                    else:
                        writer.write(t.name, tensor_bytes(read_tensor(t.source).to(t.dtype)))
                        bar.update(size)
                writer.close()
            copier.wait()
        for writer in writers:
            writer.finish()
    finally:
        for writer in writers:  # only left open when something failed
            writer.discard()
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


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


def _load_method(module: Any, name: str, options: dict[str, Any] | None) -> "Method":
    """A new method object for this conversion (`module`: its module, imported in the background)."""
    from .methods import get_method, method_class, method_names

    merger = get_method(name)
    if options and not merger.needs_calibration:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        calibrated = ", ".join(n for n in method_names() if method_class(n).needs_calibration)
        raise ConversionError(
            f"{flags}: only for calibrated methods ({calibrated}); --method {name} reads the weights alone"
        )
    return merger


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and any(fnmatch(f.name, p) for p in SIDE_FILES):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _model_card(report: Report, source_name: str) -> str:
    base = source_name if re.fullmatch(r"[\w.-]+/[\w.-]+", source_name) else Path(source_name).name
    return f"""---
base_model: {base}
tags:
- gqa-convert
- grouped-query-attention
library_name: transformers
---

# {base}, {report.kv_heads_after} KV heads

Converted from `{source_name}` with [gqa-convert](https://pypi.org/project/gqa-convert/) {__version__}:
multi-head / grouped-query attention with {report.kv_heads_before} KV heads became
{"multi-query" if report.kv_heads_after == 1 else "grouped-query"} attention with {report.kv_heads_after} KV heads
({report.num_heads} query heads, head_dim {report.head_dim}).

| | before | after |
|---|---|---|
| KV heads | {report.kv_heads_before} | {report.kv_heads_after} |
| KV cache per token | {report.kv_cache_bytes_per_token_before:,} B | {report.kv_cache_bytes_per_token_after:,} B |

- method: `{report.method}`
- dtype: `{report.dtype}`
- details and per-layer statistics: `{PROVENANCE}`

Load it with stock transformers: `AutoModelForCausalLM.from_pretrained(path)`. A converted model has lost some
quality; uptraining (`recipes/uptrain.py` in gqa-convert) wins most of it back.
"""


def verify_output(folder: Path, src: Source, expected: dict[str, tuple[int, ...]], groups: int) -> None:
    """Re-open what was written as a source: its patched config must say G KV heads, every layer's attention
    shapes must agree with that config, the keys must be the source's exactly, and the shapes as planned."""
    out = open_source(folder)
    if out.shapes.num_kv_heads != groups:
        raise AssertionError(f"the written config says {out.shapes.num_kv_heads} KV heads, not {groups}")
    if set(out.tensors) != set(src.tensors):
        extra, lost = set(out.tensors) - set(src.tensors), set(src.tensors) - set(out.tensors)
        raise AssertionError(f"output keys differ from the source: extra {sorted(extra)}, lost {sorted(lost)}")
    wrong = {k: (out.tensors[k].shape, v) for k, v in expected.items() if out.tensors[k].shape != v}
    if wrong:
        raise AssertionError(f"output shapes differ from the plan: {wrong}")


def _numpy_pool(
    src: Source, plan: list[OutTensor], method: str, dtype: str, options: dict | None = None
) -> Callable | None:
    """The pooling function when this conversion can run on numpy alone, else None (torch does it).

    That is a method with an `array_pool` (mean, first), the split layout (every tensor that changes is a KV-head
    tensor with the heads as its leading rows), --dtype keep and safetensors whose K/V are F32/F16/BF16: the
    rest of the checkpoint is then copied byte for byte, and torch, a second of CPU to import, never loads.
    """
    if array_pool(method) is None or options or src.pickle or dtype != "keep" or src.family.layout != "split":
        return None
    if any(t.source.st not in NUMPY_FLOATS for t in plan if t.computed(False)):
        return None
    return array_pool(method)


def _numpy_layers(
    src: Source, plan: list[OutTensor], pool: Callable, groups: int, report: Report
) -> Callable[[int], dict[str, "np.ndarray"]]:
    """compute_layer for the torch-free path: each KV-head tensor of a layer read as float32, pooled over its
    leading KV-head axis, rounded once to its dtype; K/V relative errors go to the report as the methods do."""
    fam, hkv = src.family, src.shapes.num_kv_heads
    by_layer: dict[int, list[OutTensor]] = {}
    for t in plan:
        if t.computed(False):
            by_layer.setdefault(t.layer, []).append(t)

    def compute_layer(layer: int) -> dict[str, np.ndarray]:
        p = fam.prefix.format(i=layer)
        errors = {f"{p}{fam.k}.weight": "k_rel_err", f"{p}{fam.v}.weight": "v_rel_err"}
        out, stats = {}, {"layer": layer}
        for t in by_layer[layer]:
            heads = read_float32(t.source).reshape(hkv, -1)  # [Hkv, numbers of one head]
            pooled = pool(heads, groups)  # [G, numbers of one head]
            if t.name in errors:
                stats[errors[t.name]] = relative_error(heads, pooled)
            out[t.name] = float32_to(pooled.reshape(t.shape), t.st)
        report.per_layer.append(stats)
        return out

    return compute_layer


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
) -> Report:
    """Convert the checkpoint at SOURCE (folder or hub id) to `num_kv_heads` KV heads, written at OUTPUT.

    The checkpoint and OUTPUT are checked before anything is written; OUTPUT appears only when complete and
    verified; SOURCE is never modified. A killed process leaves no OUTPUT; `durable` (--fsync) also covers a
    power loss: every file is on disk before the rename (what `cp` and `save_pretrained` do not wait for).
    """
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    # Mean and first pooling of a plain checkpoint need no torch (see _numpy_pool). Any other conversion starts
    # torch and the merge methods loading on a thread now, while the checkpoint is checked and planned from its
    # headers and the untouched tensors start copying: the import then costs no wall time of its own.
    maybe_numpy = array_pool(method) is not None and not method_options
    methods = None if maybe_numpy else _import_in_background(method_module(method))
    src = open_source(source, revision, allow_pickle, trust_remote_code)
    s_in = src.shapes
    check_groups(num_kv_heads, s_in)
    plan, s_out = plan_tensors(src, num_kv_heads, dtype)
    pool = _numpy_pool(src, plan, method, dtype, method_options)
    if pool is None and methods is None:
        methods = _import_in_background(method_module(method))
    shards = assign_shards(plan, parse_size(max_shard_size))
    bytes_out = sum(nbytes(t.st, t.shape) for t in plan)
    output = Path(output)

    def make_report(rewrites_queries: bool) -> Report:
        first_kv = src.family.attention_keys(0, set(src.tensors))[0]
        out_st = output_st(src.tensors[first_kv].st, dtype)  # the dtype the KV cache will have
        report = Report(
            source=src.name,
            output=str(output),
            model_type=src.raw_config["model_type"],
            method=method,
            num_heads=s_in.num_heads,
            kv_heads_before=s_in.num_kv_heads,
            kv_heads_after=num_kv_heads,
            head_dim=s_in.head_dim,
            dtype=dtype,
            tensors_total=len(plan),
            tensors_touched=[t.name for t in plan if t.computed(rewrites_queries)],
            bytes_in=src.nbytes,
            bytes_out=bytes_out,
            shards_out=len(shards),
            kv_cache_bytes_per_token_before=kv_cache_bytes_per_token(s_in, s_in.num_kv_heads, out_st),
            kv_cache_bytes_per_token_after=kv_cache_bytes_per_token(s_in, num_kv_heads, out_st),
            dry_run=dry_run,
        )
        if src.raw_config["model_type"] in QK_NORM_FAMILIES:
            report.notes.append(
                "this family normalizes keys per head after the projection (q/k norm): merged keys are pooled "
                "before that norm, so the merge is approximate on the key side even when weights agree"
            )
        return report

    if dry_run:
        return make_report(pool is None and _load_method(methods(), method, method_options).rewrites_queries)
    check_output(src.folder, output, overwrite, bytes_out)
    present = set(src.tensors)
    state: dict[str, Any] = {}

    def start_merging() -> tuple[Callable[[int], dict], bool]:
        if pool is not None:
            report = state["report"] = make_report(rewrites_queries=False)
            return _numpy_layers(src, plan, pool, num_kv_heads, report), False
        import torch

        merger = _load_method(methods(), method, method_options)
        if not merger.needs_calibration:
            # Weight-only merges are a few small, memory-bound ops per layer: one torch thread leaves the other
            # core to the copier (two made the merge twice as slow, measured on 2 cores). Restored at the end.
            state["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        report = state["report"] = make_report(merger.rewrites_queries)
        context = merger.layer_contexts(src, num_kv_heads, seed, **(method_options or {}))
        rewritten = {t.name: t for t in plan if t.computed(merger.rewrites_queries)}

        def get(key: str) -> torch.Tensor:
            # Tensors that pass through are never read: the merge sees only their shape.
            return src.get(key) if key in rewritten else torch.empty(src.tensors[key].shape, device="meta")

        def compute_layer(layer: int) -> dict[str, np.ndarray]:
            keys = src.family.attention_keys(layer, present)
            out, stats = convert_layer(
                src.family, merger, layer, get, keys, s_in, s_out, seed, context(layer) if context else None
            )
            report.per_layer.append({"layer": layer, **stats})
            return {k: tensor_bytes(v.to(rewritten[k].dtype)) for k, v in out.items() if k in rewritten}

        state["merger"] = merger
        return compute_layer, merger.rewrites_queries

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_folder(output)
    tmp.mkdir()
    try:
        _write_shards(src, shards, tmp, start_merging, progress, durable)
        report = state["report"]
        raw = src.family.patch_config(src.raw_config, num_kv_heads)
        if dtype != "keep":
            raw["dtype"] = dtype
            raw.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        _copy_side_files(src.folder, tmp)
        (tmp / "README.md").write_text(_model_card(report, src.name))
        provenance = {
            "tool": "gqa-convert",
            "version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {
                "seed": seed,
                "revision": revision,
                "max_shard_size": str(max_shard_size),
                **(method_options or {}),
            },
            **{k: v for k, v in report.as_dict().items() if k not in ("tensors_touched", "output")},
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        if "merger" in state:
            state["merger"].finish(tmp, report)
        verify_output(tmp, src, {t.name: t.shape for t in plan}, num_kv_heads)
        if durable:
            sync_folder(tmp)
        _move_into_place(tmp, output)
        if durable:
            fsync_path(output.parent)  # the rename itself
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if "threads" in state:
            import torch

            torch.set_num_threads(state["threads"])
    return report


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished folder to OUTPUT; an existing OUTPUT (--overwrite) is moved aside first, then removed."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.gqa-old-{os.getpid()}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe(source: str | Path, revision: str | None = None, allow_pickle: bool = False) -> dict:
    """What `gqa-convert inspect` prints: family, heads, head_dim, valid G and KV-cache bytes per token for each."""
    src = open_source(source, revision, allow_pickle)
    s = src.shapes
    st = next((t.st for t in src.tensors.values() if t.st in FLOATING), "F32")
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
    }
