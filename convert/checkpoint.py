"""Checkpoint folders in and out: resolve SOURCE, check everything before writing, stream the conversion into a
temporary folder beside OUTPUT, verify it, and only then rename it into place.

Memory stays flat: tensors are read one at a time with plain file reads, tensors the conversion does not touch are
copied inside the kernel on a background thread, and output shards are written with headers declared up front.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from . import __version__
from .core import check_groups, convert_layer, kv_cache_bytes_per_token
from .families import QK_NORM_FAMILIES, ConversionError, Shapes, output_shapes
from .families_mha import modeling_template
from .methods import array_pool, method_module
from .pooling import relative_error
from .shipped import check_method, load_hint, require_flag, ship_modeling_code, shipped_note, template_manifest
from .source import SIDE_FILES, Source, describe, open_source  # noqa: F401  (describe: re-exported)
from .tensorio import (
    FLOATING,
    NUMPY_FLOATS,
    Copier,
    ShardWriter,
    TensorInfo,
    float32_to,
    fsync_path,
    nbytes,
    read_float32,
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

PROVENANCE = "gqa_convert.json"
DTYPE_CHOICES = ("keep", "float32", "float16", "bfloat16")


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
    # How the output is stored and loaded: "as is" (the source's class), a stock route, or "shipped code".
    route: str = "as is"
    output_model_type: str = ""
    load_with: str = "AutoModelForCausalLM.from_pretrained(path): stock transformers, no remote code"

    def as_dict(self) -> dict:
        return asdict(self)


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

{_load_line(report)} A converted model has lost some
quality; uptraining (`recipes/uptrain.py` in gqa-convert) wins most of it back.
{_route_card(report)}"""


def _route_card(report: Report) -> str:
    """The model card's paragraph on a stock re-expression route (empty otherwise)."""
    if report.route in ("as is", "shipped code"):
        return ""
    return (
        f"\nThe source is `{report.model_type}`, whose transformers class has no KV-head count: it was re-expressed "
        f"as `{report.output_model_type}` (route `{report.route}`), a stock class that computes the same function "
        f"and can hold {report.kv_heads_after} KV heads. Load: {report.load_with}.\n"
    )


def _load_line(report: Report) -> str:
    for note in report.notes:
        if note.startswith("route: modeling code"):  # the shipped-code route: the note ends with how to load it
            return f"It ships its own modeling code: {note.rsplit('; ', 1)[-1]}."
    return "Load it with stock transformers: `AutoModelForCausalLM.from_pretrained(path)`."


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
    if any(t.source.st not in NUMPY_FLOATS or t.source.derive is not None for t in plan if t.computed(False)):
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
    write_modeling_code: bool = False,
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
    src = open_source(source, revision, allow_pickle, trust_remote_code, groups=num_kv_heads)
    s_in = src.shapes
    check_groups(num_kv_heads, s_in)
    template = modeling_template(src.family, num_kv_heads, s_in.num_heads)
    if template:
        require_flag(template, write_modeling_code, f"{src.raw_config['model_type']} with {num_kv_heads} KV heads")
        check_method(template, method)
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
        report.output_model_type = src.raw_config["model_type"]
        if src.route is not None:
            report.model_type = src.route.source_model_type
            report.route, report.load_with = src.route.route, src.route.load_with
            report.bytes_in = src.route.source_bytes
            report.notes.extend(src.route.notes)
        if template:
            report.notes.append(shipped_note(template))
            report.route, report.load_with = "shipped code", load_hint(template_manifest(template)["loads_with"])
            report.output_model_type = template_manifest(template)["model_type"]
        if src.family.cache_notes is not None:
            element = nbytes(out_st, ())
            report.notes += src.family.cache_notes(s_in, s_in.num_kv_heads, num_kv_heads, element)
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
        if template:
            raw = ship_modeling_code(template, tmp, raw, num_kv_heads)
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
