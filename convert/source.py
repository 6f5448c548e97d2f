"""Reading a checkpoint: resolve SOURCE (folder or hub id), read its config and shard headers, and check that the
config, the index and the weights agree, all before anything is written and before torch has loaded."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .core import kv_cache_bytes_per_token, valid_groups
from .families import ConversionError, Family, Shapes, family_for, shapes_for
from .tensorio import DTYPES, FLOATING, TensorInfo, read_header, read_pickle_header, read_tensor

if TYPE_CHECKING:
    import torch

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
