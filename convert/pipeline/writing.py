"""Writing a planned conversion: the shards streamed tensor by tensor (pass-through copies on a background
thread), the merged layers computed by numpy or by a torch method, and the written folder verified."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.io.safetensors import (
    NUMPY_FLOATS,
    Copier,
    ShardWriter,
    float32_to,
    named,
    nbytes,
    read_float32,
    read_stored,
    read_tensor,
    tensor_bytes,
    to_float32,
)
from convert.methods import array_pool
from convert.methods.pooling import ratio_of_norms, relative_error, squared_errors
from convert.pipeline.merge import convert_layer
from convert.pipeline.planning import OutTensor
from convert.pipeline.source import open_source

if TYPE_CHECKING:  # torch loads on a background thread during a conversion (see convert.pipeline.conversion)
    import numpy as np
    import torch

    from convert.families import Shapes
    from convert.methods import Method
    from convert.pipeline.report import Report
    from convert.pipeline.source import Source

# compute_layer(layer) -> the bytes of every tensor the merge rewrites in that layer, in its output dtype
ComputeLayer = Callable[[int], dict[str, "np.ndarray"]]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(
    shards: list[list[OutTensor]],
    folder: Path,
    start_merging: Callable[[], tuple[ComputeLayer, bool]],
    progress: bool,
    durable: bool = False,
) -> dict[str, str]:
    """Stream every output tensor into its shard; returns the weight map.

    First every tensor that no method changes (outside attention, same dtype) is handed to the copier thread.
    Only then does `start_merging` wait for torch and the merge method, which load on a thread of their own
    meanwhile (unless the merge needs no torch), and return (compute_layer, rewrites_queries); the attention
    tensors follow, layer by layer.
    """
    names = shard_names(len(shards))
    total = sum(nbytes(t.st, t.shape) for shard in shards for t in shard)
    bar = progress_bar(total, "converting", progress)
    weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
    writers: list[ShardWriter] = []
    try:
        with Copier() as copier:  # pass-through copies run beside the import and the merging, on a second thread
            for shard, name in zip(shards, names):
                entries = [(t.name, t.st, t.shape) for t in shard]
                copied = {t.name: t.source.offset for t in shard if t.verbatim}
                writers.append(ShardWriter(folder / name, entries, {"format": "pt"}, copier, durable, copied))
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
        write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return weight_map


def numpy_pool(src: Source, plan: list[OutTensor], method: str, dtype: str, options: dict | None = None) -> Any:
    """The pooling function when this conversion can run on numpy alone, else None (torch does it).

    That is a method with an `array_pool` (mean, first), --dtype keep and safetensors whose K/V are F32/F16/BF16,
    in a layout pooled on the stored rows (`Family.pools_by_rows`; a fused q/k/v tensor goes through
    `Family.pool_fused`, which runs on numpy too): the rest of the checkpoint is then copied byte for byte, and
    torch, a second of CPU to import, never loads.
    """
    if array_pool(method) is None or options or src.pickle or dtype != "keep" or not src.family.pools_by_rows():
        return None
    if any(t.source.st not in NUMPY_FLOATS or t.source.derive is not None for t in plan if t.computed(False)):
        return None
    return array_pool(method)


def numpy_layers(src: Source, plan: list[OutTensor], pool: Callable, s_out: Shapes, report: Report) -> ComputeLayer:
    """compute_layer for the torch-free path: each tensor that changes read as float32, its KV heads pooled (the
    leading axis of a K/V tensor; the K and V row blocks of a fused q/k/v tensor, rows rearranged as the output
    layout has them), rounded once to its dtype; K/V relative errors go to the report as the methods do."""
    fam, hkv, groups = src.family, src.shapes.num_kv_heads, s_out.num_kv_heads
    by_layer: dict[int, list[OutTensor]] = {}
    for t in plan:
        if t.computed(False):
            by_layer.setdefault(t.layer, []).append(t)

    def compute_layer(layer: int) -> dict[str, np.ndarray]:
        p = fam.prefix.format(i=layer)
        out, stats = {}, {"layer": layer}
        errors: list[float] = []  # of the pools of the tensor at hand

        def noted(heads: np.ndarray, g: int) -> np.ndarray:  # [Hkv, numbers of one head] -> [G, ...]
            pooled = pool(heads, g)
            errors.append(relative_error(heads, pooled))
            return pooled

        for t in by_layer[layer]:
            errors.clear()
            if fam.layout == "split":
                out[t.name], error = pool_columns(read_stored(t.source).reshape(hkv, -1), t.st, groups, pool)
                errors.append(error)
                kinds = {f"{p}{fam.k}.weight": ["k_rel_err"], f"{p}{fam.v}.weight": ["v_rel_err"]}
            else:  # fused: K is pooled first, then V
                x = read_float32(t.source)
                pooled = fam.pool_fused(x.reshape(x.shape[0], -1), src.shapes, s_out, noted)  # weight or [rows, 1]
                out[t.name] = float32_to(pooled.reshape(t.shape), t.st)
                kinds = {f"{p}{fam.fused}.weight": ["k_rel_err", "v_rel_err"]}
            stats.update(zip(kinds.get(t.name, []), errors))
        report.per_layer.append({k: stats[k] for k in ("layer", "k_rel_err", "v_rel_err") if k in stats})
        return out

    return compute_layer


# Columns per block in `pool_columns`: a [Hkv, block] float32 slab (512 KB at 16 heads) stays in the CPU cache.
COLUMN_BLOCK = 8192


def pool_columns(stored: np.ndarray, st: str, groups: int, pool: Callable) -> tuple[np.ndarray, float]:
    """[Hkv, n] stored numbers of dtype `st` -> ([G, n] stored numbers, relative error), a block of columns at a
    time. Pooling acts on each column alone, so the bits equal those of pooling the whole tensor; the float32
    working copies stay in cache instead of streaming through memory, which the copier's kernel copy shares."""
    import numpy as np

    out = np.empty((groups, stored.shape[1]), stored.dtype)
    diff_squares = original_squares = 0.0
    for j in range(0, stored.shape[1], COLUMN_BLOCK):
        x = to_float32(stored[:, j : j + COLUMN_BLOCK], st)  # [Hkv, block]
        pooled = pool(x, groups)  # [G, block]
        d, o = squared_errors(x, pooled)
        diff_squares, original_squares = diff_squares + d, original_squares + o
        out[:, j : j + COLUMN_BLOCK] = float32_to(pooled, st)
    return out, ratio_of_norms(diff_squares, original_squares)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A byte-counting tqdm bar, or a stand-in that ignores updates: a quiet run never imports tqdm."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def torch_layers(
    src: Source,
    plan: list[OutTensor],
    merger: Method,
    s_out: Shapes,
    seed: int,
    context: Callable[[int], dict] | None,
    report: Report,
) -> ComputeLayer:
    """compute_layer for a torch method: the layer's attention tensors split into heads, merged, joined back."""
    import torch

    present = set(src.tensors)
    rewritten = {t.name: t for t in plan if t.computed(merger.rewrites_queries)}

    def get(key: str) -> torch.Tensor:
        # Tensors that pass through are never read: the merge sees only their shape.
        return src.get(key) if key in rewritten else torch.empty(src.tensors[key].shape, device="meta")

    def compute_layer(layer: int) -> dict[str, np.ndarray]:
        keys = src.family.attention_keys(layer, present)
        ctx = context(layer) if context else None
        out, stats = convert_layer(src.family, merger, layer, get, keys, src.shapes, s_out, seed, ctx)
        report.per_layer.append({"layer": layer, **stats})
        return {k: tensor_bytes(v.to(rewritten[k].dtype)) for k, v in out.items() if k in rewritten}

    return compute_layer


def write_text(path: Path, text: str) -> None:
    """Write a small file; a failure names it (a failed write() does not say which file it was writing)."""
    try:
        path.write_text(text)
    except OSError as e:
        raise named(e, path) from e


def copy_side_files(src: Path, dst: Path, patterns: list[str]) -> list[str]:
    """Copy the tokenizer and generation files (`patterns`) from the source folder."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and any(fnmatch(f.name, p) for p in patterns):
            try:
                shutil.copy2(f, dst / f.name)
            except OSError as e:
                raise named(e, dst / f.name) from e
            copied.append(f.name)
    return copied


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
