"""A route's parts as data: the key-table rows (`Map`), the route itself (`Route`) and what a taken route reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

Transform = Callable[..., "Tensor"]  # fn(z, *source tensors in float32, None where an optional one is absent)


@dataclass(frozen=True)
class Map:
    """One target tensor: `fn` of the source tensors named in `sources` (None: a plain rename of one source).

    `{i}` in a name is the layer index. A source name starting with `?` is optional: a rename of an absent optional
    source writes nothing (a tied head), a transform receives None (and writes zeros or ones in its place).
    """

    target: str
    sources: tuple[str, ...]
    fn: Transform | None = None


@dataclass(frozen=True)
class Route:
    """How one source layout becomes a stock class: the key table and the target config.json, as data."""

    name: str  # "gpt_neox -> phi"
    source_type: str
    target_type: str
    applies: Callable[[Any], bool]  # on the source's transformers config
    target_config: Callable[[Any, dict], dict]  # (source config object, source config.json) -> target config.json
    layer_maps: Callable[[Any], tuple[Map, ...]]  # per-layer rows, chosen from the source config
    global_maps: Callable[[Any], tuple[Map, ...]]
    sizes: Callable[[Any], dict[str, int]]  # H, d, D, V, L, ... for the transforms
    # Source keys that hold no weights (attention-mask and rotary buffers of older checkpoints): regex -> why.
    ignore: Mapping[str, str] = field(default_factory=dict)
    # Older checkpoints name keys without the model's base prefix: (prefix to add, regex of keys that lack it).
    base_prefix: tuple[str, str] | None = None
    summary: str = ""

    @property
    def load_with(self) -> str:
        return f"AutoModelForCausalLM.from_pretrained(path): stock transformers {self.target_type}, no remote code"


@dataclass
class RouteInfo:
    """What the report, inspect and the model card say about a route that was taken."""

    route: str
    source_model_type: str
    output_model_type: str
    load_with: str
    source_bytes: int = 0  # the source checkpoint's tensor bytes (the view's differ: split, folded, zeros)
    notes: list[str] = field(default_factory=list)


def common_config(config: Any, raw: dict) -> dict:
    """What every target config.json carries over: dtype, token ids, tying, vocabulary, cache use."""
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "vocab_size", "use_cache")
    out = {k: getattr(config, k) for k in keep if getattr(config, k, None) is not None}
    for key in ("dtype", "torch_dtype"):
        if key in raw:
            out["dtype"] = raw[key]
    return out
