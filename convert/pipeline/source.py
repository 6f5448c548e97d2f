"""Reading a checkpoint: resolve SOURCE (folder or hub id), read its config and shard headers, and check that the
config, the index and the weights agree, all before anything is written and before torch has loaded."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.families import FAMILIES, Family, Shapes, config_dtype, config_view, family_for, shapes_for
from convert.families.mha import modeling_template, takes_shipped_route
from convert.io.safetensors import DTYPES, FLOATING, TensorInfo, nbytes, read_header, read_pickle_header, read_tensor
from convert.pipeline.merge import kv_cache_bytes_per_token, valid_groups
from convert.routes import reexpress
from convert.routes.shipped import shipped_note

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
    route: reexpress.RouteInfo | None = None  # set when the checkpoint is read as a stock class (re-expression)

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


def _weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool, dict[str, str] | None]:
    """The weight shards of a folder in index order, whether they are pickles, and the index's weight map (None
    for a single file); refuses pickle unless allowed."""
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
        if not index.exists():
            return [one], is_pickle, None
        weight_map = _read_index(index)
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ConversionError(
                f"{index.name} names shard(s) that do not exist: {', '.join(missing)}. "
                "The download is incomplete: fetch the missing files"
            )
        return [folder / f for f in files], is_pickle, weight_map
    raise ConversionError(f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json")


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight map, tensor name -> shard file name in the same folder."""
    try:
        raw = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{index} is not valid JSON ({e}): re-download it")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no weight_map object naming the shards: re-download it")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise ConversionError(
                f"{index}: tensor {name} maps to {file!r}, not a file name in the same folder: re-download it"
            )
    return weight_map


def _read_tensors(files: list[Path], is_pickle: bool, weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    """Every tensor of every shard, each exactly once, and each where the index says it is: a tensor in two
    shards, or one that the index and the headers disagree about, is refused before anything is written."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos = read_pickle_header(f) if is_pickle else read_header(f)[0]
        twice = sorted(set(infos) & set(tensors))
        if twice:
            raise ConversionError(
                f"{f} holds {twice[0]}, which {tensors[twice[0]].file.name} also holds"
                f"{f' ({len(twice)} tensors in both)' if len(twice) > 1 else ''}: one of the two shards is stale. "
                "Re-download the checkpoint"
            )
        tensors.update(infos)
    if weight_map is None:
        return tensors
    index = files[0].parent / ("pytorch_model.bin.index.json" if is_pickle else "model.safetensors.index.json")
    for name, info in tensors.items():
        if name not in weight_map:
            raise ConversionError(
                f"{info.file} holds {name}, which {index.name} does not list: the index and the shards are from "
                "different downloads. Re-download the checkpoint"
            )
        if weight_map[name] != info.file.name:
            raise ConversionError(
                f"{index} puts {name} in {weight_map[name]}, but it is in {info.file.name}: the index and the "
                "shards are from different downloads. Re-download the checkpoint"
            )
    absent = [n for n in weight_map if n not in tensors]
    if absent:
        raise ConversionError(
            f"{index} lists {absent[0]} in {weight_map[absent[0]]}, but no shard holds it"
            f"{f' ({len(absent)} such tensors)' if len(absent) > 1 else ''}. Re-download the checkpoint"
        )
    return tensors


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {folder}: SOURCE must be a transformers model folder")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}): fix or re-download it")
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} must hold a JSON object, not {type(raw).__name__}: fix or re-download it")
    return raw


def load_config(folder: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError/TypeError/KeyError for bad fields
        raise ConversionError(f"{folder}/config.json could not be read by transformers ({type(e).__name__}: {e})")


def open_source(
    source: str | Path,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    groups: int | None = None,
) -> Source:
    """Resolve and open SOURCE; checks config, family, index, shard headers and head counts against weight shapes.

    Sizes come from config.json itself (`config_view`): transformers loads only when a calibrated method asks for
    `Source.config`. A classic MHA family with a stock route (convert.routes.reexpress) is read as that stock class,
    unless converting to `groups` KV heads takes the shipped-code route (`groups` None: inspecting, the stock route)."""
    folder, name = resolve_source(source, revision, allow_pickle)
    raw = read_config(folder)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise ConversionError(
            f"{folder / 'config.json'} has no model_type naming the architecture (found {model_type!r}): "
            "SOURCE must be a transformers model folder. Re-download config.json"
        )
    if reexpress.is_route_source(raw) and not takes_shipped_route(raw, groups):
        src = _open_route(folder, name, raw, allow_pickle, trust_remote_code)
        if src is not None:
            return src
    family = family_for(model_type)
    if hasattr(family, "config_view"):  # classic MHA rows read with their stock config class, never shipped code
        view = family.config_view(raw)
    else:
        view = config_view(raw, family, folder / "config.json")
    files, is_pickle, weight_map = _weight_files(folder, allow_pickle)
    tensors = _read_tensors(files, is_pickle, weight_map)
    if hasattr(family, "for_keys"):  # tensor names with or without the base model's prefix
        family = family.for_keys(set(tensors))
    shapes = shapes_for(family, view)
    src = Source(folder, name, raw, family, shapes, tensors, is_pickle, trust_remote_code)
    _check_weights(src)
    return src


def _open_route(folder: Path, name: str, raw: dict, allow_pickle: bool, trust_remote_code: bool) -> Source | None:
    """The checkpoint as its stock route's class (a view: no tensor data read), or None when no route fits it."""
    source_config = load_config(folder, trust_remote_code)
    route = reexpress.route_for(raw, source_config)
    if route is None:
        return None
    files, is_pickle, weight_map = _weight_files(folder, allow_pickle)
    tensors = _read_tensors(files, is_pickle, weight_map)
    target, tensors, info = reexpress.build_view(route, source_config, raw, tensors)
    family, config = family_for(route.target_type), reexpress.target_config_object(target)
    src = Source(folder, name, target, family, shapes_for(family, config), tensors, is_pickle, trust_remote_code)
    src._config, src.route = config, info
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
    config = src.folder / "config.json"
    for layer in range(s.num_layers):
        keys = fam.attention_keys(layer, present)
        prefix = fam.prefix.format(i=layer)
        found = {k[len(prefix) :]: src.tensors[k].shape for k in keys}
        missing = [f"{n}.weight" for n in [*required, fam.o] if f"{n}.weight" not in found]
        wrong = [k for k, shape in found.items() if tuple(shape) not in _allowed_shapes(k, s, fam)]
        if missing or wrong:
            what = f"missing {', '.join(missing)}; " if missing else ""
            files = sorted({src.tensors[prefix + k].file.name for k in wrong})
            raise ConversionError(
                f"layer {layer}: the attention weights{' in ' + ', '.join(files) if files else ''} do not match "
                f"{config} ({s.num_heads} heads, {s.num_kv_heads} KV heads, head_dim {s.head_dim}, hidden "
                f"{s.hidden}): {what}found {found or 'none'}. The config and the weights disagree: fix config.json "
                "or re-download the checkpoint"
            )
        for k in keys:  # an integer dtype here is a flipped or foreign header, never a weight we could pool
            if src.tensors[k].st not in FLOATING:
                raise ConversionError(
                    f"{src.tensors[k].file}: {k} is stored as {src.tensors[k].st}, not a float dtype; attention "
                    "weights must be floats (quantized checkpoints are not supported). Re-download the checkpoint"
                )
    beyond = fam.prefix.format(i=s.num_layers)
    extra = next((k for k in present if k.startswith(beyond)), None)
    if extra is not None:
        raise ConversionError(
            f"{src.tensors[extra].file} holds {extra}, a layer beyond the {s.num_layers} layers of {config}: "
            "the config and the weights disagree. Fix num_hidden_layers in config.json"
        )


def _shapes(name: str, s: Shapes, fam: Family) -> set[tuple[int, ...]]:
    """The shapes a layer tensor may have given the config (its size alone would accept transposed weights)."""
    H, Hkv, d, D = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden
    base, kind = name.rsplit(".", 1)
    if base == fam.o:
        return {(D, H * d)}
    if base in (fam.q_norm, fam.k_norm):  # shared by all heads ([d]), flat over the projection, or [heads, d]
        heads = H if base == fam.q_norm else Hkv
        return {(d,), (heads * d,), (heads, d)}
    rows = {fam.q: H * d, fam.k: Hkv * d, fam.v: Hkv * d, fam.fused: (H + 2 * Hkv) * d}[base]
    return {(rows, D) if kind == "weight" else (rows,)}


def _allowed_shapes(name: str, s: Shapes, fam: Family) -> set[tuple[int, ...]]:
    """`_shapes` as the row stores them: a row with Conv1D weights ([in, out], GPT-2) holds the transposes
    (its biases are 1-D, unchanged; it has no q/k norms)."""
    shapes = _shapes(name, s, fam)
    return {shape[::-1] for shape in shapes} if getattr(fam, "transposed", False) else shapes


def describe(source: str | Path, revision: str | None = None, allow_pickle: bool = False) -> dict:
    """What `gqa-convert inspect` prints: family, heads, head_dim, valid G and KV-cache bytes per token for each."""
    src = open_source(source, revision, allow_pickle)
    s = src.shapes
    st = next((t.st for t in src.tensors.values() if t.st in FLOATING), "F32")
    notes = src.family.cache_notes(s, s.num_kv_heads, s.num_kv_heads, nbytes(st, ())) if src.family.cache_notes else []
    # Shipped code holds any G below H that the output class cannot (the source family's row knows its template).
    kind = src.route.source_model_type if src.route else src.raw_config["model_type"]
    rows = next((f for f in FAMILIES if kind in f.model_types), src.family)
    shipped = {
        g: shipped_note(t)
        for g in valid_groups(s)
        if (t := modeling_template(rows, g, s.num_heads)) and not (src.route and _holds(src, g))
    }
    return {
        "source": src.name,
        "model_type": src.route.source_model_type if src.route else src.raw_config["model_type"],
        "output_model_type": src.raw_config["model_type"],
        "route": src.route.route if src.route else "as is",
        "load_with": src.route.load_with if src.route else "AutoModelForCausalLM.from_pretrained(path)",
        "layers": s.num_layers,
        "hidden_size": s.hidden,
        "num_heads": s.num_heads,
        "num_kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "rotary_dim": s.rotary_dim,
        "dtype": DTYPES[st][0],
        "config_dtype": config_dtype(src.raw_config),
        "parameters": sum(math.prod(t.shape) for t in src.tensors.values()),
        "valid_num_kv_heads": {
            g: kv_cache_bytes_per_token(s, g, st) for g in valid_groups(s) if g in shipped or _holds(src, g)
        },
        # G -> how the output of that G loads, where it needs shipped modeling code (--write-modeling-code)
        "shipped_code": shipped,
        "notes": notes,
    }


def _holds(src: Source, groups: int) -> bool:
    """Whether the output class can hold G KV heads (gpt_bigcode, sequential falcon: H or 1 only)."""
    try:
        src.family.patch_config(src.raw_config, groups)
    except ConversionError:
        return False
    return True
