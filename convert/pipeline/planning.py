"""Planning a conversion from sizes alone: every output tensor's dtype, shape and shard, before any data is read
and before torch has loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convert.errors import ConversionError
from convert.families import Shapes, output_shapes
from convert.io.safetensors import FLOATING, TensorInfo, nbytes, st_dtype, torch_dtype

if TYPE_CHECKING:
    import torch

    from convert.pipeline.source import Source


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
