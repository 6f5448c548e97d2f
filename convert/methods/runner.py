"""One decoder layer at a time, with the checkpoint's transformers modeling code (a stock class, or a shipped-code
template's classes imported from this package's own files).

The model is built on the meta device (no memory); its buffers (rotary tables, embedding scales) are then made
real, and so are the small tensors its forward uses outside the layers (learned positions, an embedding norm), so
the first layer's input is the model's own. A decoder layer's parameters are assigned from the checkpoint when it
runs and handed back to the meta device after. Peak memory is one layer, the embedding matrix while the calibration
text is embedded, and the calibration activations. Only public APIs: `from_config`, `initialize_weights`,
`load_state_dict(assign=True)`, forward hooks, and `set_submodule` to put a stand-in where the model calls a layer
or an attention module.
"""

from __future__ import annotations

import copy
import ctypes
import importlib
import sys
import types
from typing import Any

import torch
from torch import Tensor

from convert.errors import ConversionError
from convert.routes.shipped import COMMON, TEMPLATES, template_manifest


class _Stop(Exception):
    """Raised from a hook once what was wanted is captured: the rest of the layer is not computed."""


class _Probe(torch.nn.Module):
    """Stands in for decoder layers in the model's forward: passes through, or records what the model hands the
    layer (hidden states and keyword arguments: masks, rotary tables, positions) and stops."""

    def __init__(self, like: torch.nn.Module, record: dict | None):
        super().__init__()
        self.record = record
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.record is None:
            return hidden
        self.record.update(hidden=hidden, args=args[1:], kwargs=kwargs)
        raise _Stop


class _GivenOutput(torch.nn.Module):
    """Stands in for an attention module whose output is already known: returns the next given chunk, shaped like
    the module's own output (a tensor, or a tuple of `width` with the tensor first)."""

    def __init__(self, chunks: list[Tensor], width: int):
        super().__init__()
        self.chunks, self.width = iter(chunks), width

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = next(self.chunks)
        return (out, *([None] * (self.width - 1))) if self.width else out


def template_classes(template: str) -> tuple[type, type]:
    """The (config class, causal-LM class) of a shipped-code template, imported from the package's own template
    files (never from a checkpoint folder): a package whose path is the template's folder and the common one, so
    the templates' relative imports resolve as they do beside a checkpoint."""

    manifest = template_manifest(template)
    name = f"_gqa_convert_template_{template}"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(TEMPLATES / template), str(TEMPLATES / COMMON)]
        sys.modules[name] = package
    auto = manifest["auto_map"]

    def load(ref: str) -> type:
        module, cls = ref.rsplit(".", 1)
        return getattr(importlib.import_module(f"{name}.{module}"), cls)

    # the class that loads the output: the causal LM, or T5's seq2seq class (`loads_with` in template.json)
    return load(auto["AutoConfig"]), load(auto[manifest.get("loads_with", "AutoModelForCausalLM")])


# Free heap bytes kept between layers whatever the layer's size: small models fault memory in too (a few ms each).
FREE_HEAP_FLOOR = 256 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


_libc: Any = False  # glibc's (malloc_trim, mallinfo2), looked up on first use (None where there are none)


def release_freed_memory(keep: int = 0) -> None:
    """Hand the free pages of the C heap back to the system once it holds more than `keep` free bytes (glibc's
    `malloc_trim`; elsewhere nothing happens).

    glibc serves blocks below its mmap threshold (which grows to 32 MB as large blocks are freed, or which the CLI
    sets there) from heaps that shrink only from the top. A layer's float32 weights and the intermediates of its
    forward are freed once it ran, but the activations carried to the next layer sit between them: unreleased,
    those free pages added up layer after layer, and the process grew with the model instead of with one layer.
    Trimming every time costs page faults when the next layer takes the memory again, so up to `keep` free bytes
    stay for it.
    """
    global _libc
    if _libc is False:
        try:
            libc = ctypes.CDLL(None)
            info = libc.mallinfo2
            info.restype = _MallInfo2
            _libc = (libc.malloc_trim, info)
        except (OSError, AttributeError):  # not glibc, or older than 2.33
            _libc = None
    if _libc is not None and _libc[1]().fordblks > keep:
        _libc[0](0)


def _on_meta(module: torch.nn.Module) -> dict[str, Tensor]:
    """The module's parameters as meta tensors, to hand its memory back with `load_state_dict(assign=True)`."""
    return {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in module.named_parameters()}


class LayerRunner:
    """A model skeleton on the meta device, materializing one decoder layer at a time from the source."""

    def __init__(
        self,
        source: Any,
        new_config: Any,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        chunk_tokens: int = 2048,
        eager: bool = False,
        source_config: Any = None,
        model_class: type | None = None,
    ):
        self.source, self.dtype, self.chunk_tokens = source, dtype, chunk_tokens
        self.device = torch.device(device)
        fam = source.family
        self.layer_prefix = fam.prefix[: fam.prefix.index("{i}")]  # "model.layers."
        inner = fam.prefix[fam.prefix.index("{i}") + 4 :].rstrip(".")  # "self_attn"
        self.attn_path, self.o_path = inner, f"{inner}.{fam.o}"
        # A shipped-code template class (`model_class`) builds both the original (its KV count at H) and the
        # merged model; otherwise the stock class of each config.
        self.model_class = model_class
        config = source_config if source_config is not None else source.config
        self.skeleton = self._skeleton(config)
        self.skeleton_new = self._skeleton(new_config)
        # Attention probabilities come only from eager attention, several times slower than the default (sdpa):
        # a second skeleton of the original model runs eager, for the one pass that needs them.
        self.skeleton_eager = self._skeleton(config, "eager") if eager else None
        # Checkpoints saved from the base model (the hub's gpt2, opt, bloom) name tensors without the causal LM's
        # `transformer.` / `model.`: the skeleton's names carry it, the checkpoint's do not.
        self.model_prefix = ""
        try:
            self.skeleton.get_submodule(self.layer_prefix.rstrip("."))
        except AttributeError:
            self.model_prefix = f"{self.skeleton.base_model_prefix}."
        stage = self._stage(self.skeleton)
        for model in self._models(False):  # the eager twin shares the tensors
            model.load_state_dict(stage, strict=False, assign=True)
        self.layer_types = getattr(self.skeleton.config, "layer_types", None)
        self._kwargs: dict[tuple, tuple] = {}
        self._attn_width = 2
        # Whether the attention module returns its o_proj output as it is (bloom adds the residual inside it): only
        # then may a known o_proj output stand in for the attention module.
        self.o_is_attention_output = True

    def _skeleton(self, config: Any, attn_implementation: str | None = None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        # A copy: the model keeps its config object and sets the attention implementation on it.
        with torch.device("meta"):
            if self.model_class is not None:
                model = self.model_class._from_config(copy.deepcopy(config), dtype=self.dtype, **extra)
            else:
                model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=self.dtype, **extra)
        model.eval()
        # Buffers (rotary tables, scales) are computed, not stored: make them real and let transformers fill them.
        # Parameters stay on the meta device, where initializing them costs nothing.
        for mod in model.modules():
            own = [(n, b) for n, b in mod.named_buffers(recurse=False) if b is not None and b.is_meta]
            kept = set(mod.state_dict(keep_vars=True)) if own else set()
            for name, buf in own:
                mod.register_buffer(name, torch.empty_like(buf, device=self.device), persistent=name in kept)
        model.initialize_weights()
        return model

    def _stage(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The checkpoint's tensors for every parameter outside the decoder layers, the token embedding and the
        output head: the embedding stage the model's forward runs before layer 0 (learned positions, an embedding
        LayerNorm, OPT's project_in), reproduced by the model's own modules; small (the final norm comes along).
        The token embedding is made real only while the calibration text is embedded."""
        skip = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
        skip.add(id(self.layers(model)))
        stage: dict[str, Tensor] = {}

        def walk(module: torch.nn.Module, prefix: str) -> None:
            if id(module) in skip:
                return
            for name, p in module.named_parameters(recurse=False):
                key = f"{prefix}{name}"
                if p.is_meta and self._ckpt(key) in self.source.tensors:
                    stage[key] = self._cast(self.source.get(self._ckpt(key)))
            for name, child in module.named_children():
                walk(child, f"{prefix}{name}.")

        walk(model, "")
        return stage

    def _ckpt(self, name: str) -> str:
        """The checkpoint's name for a skeleton tensor name."""
        return name.removeprefix(self.model_prefix) if self.model_prefix else name

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(f"{self.model_prefix}{self.layer_prefix}".rstrip("."))

    def _models(self, new: bool) -> list[torch.nn.Module]:
        return [self.skeleton_new] if new else [m for m in (self.skeleton, self.skeleton_eager) if m is not None]

    def load(self, new: bool, i: int, tensors: dict[str, Tensor]) -> torch.nn.Module:
        """Materialize layer i of a skeleton with `tensors` (names relative to the layer), in the compute dtype (the
        eager twin of the original shares the same tensors)."""
        layer = self.layers(self._models(new)[0])[i]
        wanted = {n for n, _ in layer.named_parameters()}
        missing = sorted(wanted - set(tensors))
        if missing:
            raise ConversionError(f"layer {i}: the checkpoint lacks {missing} that the model class needs")
        cast = {k: self._cast(v) for k, v in tensors.items() if k in wanted or k in layer.state_dict()}
        for model in self._models(new):
            self.layers(model)[i].load_state_dict(cast, strict=False, assign=True)
        return layer

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def unload(self, new: bool, i: int) -> None:
        """Hand layer i's tensors back to the meta device, and their memory back to the system beyond what such a
        layer takes (the next layer reuses that much without faulting it in afresh)."""
        layer_bytes = 0
        for model in self._models(new):
            layer = self.layers(model)[i]
            layer_bytes = max(layer_bytes, sum(p.numel() * p.element_size() for p in layer.parameters()))
            layer.load_state_dict(_on_meta(layer), strict=False, assign=True)
        release_freed_memory(keep=max(layer_bytes, FREE_HEAP_FLOOR))

    def _record(self, i: int, inputs_embeds: Tensor, model: torch.nn.Module | None = None) -> dict:
        """Run the model's forward up to layer i with probes in place of the layers; returns what layer i gets."""
        model = model or self.skeleton
        layers = self.layers(model)
        saved = list(layers)
        record: dict = {}
        try:
            for j in range(i + 1):
                layers[j] = _Probe(saved[j], record if j == i else None)
            model(inputs_embeds=inputs_embeds, use_cache=False)
        except _Stop:
            pass
        finally:
            for j in range(i + 1):
                layers[j] = saved[j]
        if "hidden" not in record:
            raise ConversionError(f"could not reach layer {i} of the model's forward to calibrate it")
        if record["hidden"].is_meta:
            raise ConversionError(f"the input of layer {i} depends on tensors the checkpoint lacks: cannot calibrate")
        return record

    def layer_call(self, i: int, batch: int, seq: int, eager: bool = False) -> tuple[tuple, dict]:
        """The positional and keyword arguments the model passes to layer i (cached per layer type, shape and
        attention implementation: the mask an eager layer gets differs from the one sdpa gets)."""
        kind = self.layer_types[i] if self.layer_types else None
        first = self.layer_types.index(kind) if self.layer_types else 0
        key = (kind, batch, seq, eager)
        if key not in self._kwargs:
            width = self.skeleton.get_input_embeddings().embedding_dim  # OPT's project_in: not the hidden size
            embeds = torch.zeros(batch, seq, width, dtype=self.dtype, device=self.device)
            rec = self._record(first, embeds, self.skeleton_eager if eager else self.skeleton)
            self._kwargs[key] = (rec["args"], rec["kwargs"])
        return self._kwargs[key]

    def embed(self, ids: Tensor) -> list[Tensor]:
        """First-layer inputs for the calibration ids, in chunks, as the model computes them (embedding scale
        and any input normalizer included)."""
        emb = self.skeleton.get_input_embeddings()
        name = next(n for n, m in self.skeleton.named_modules() if m is emb)
        key = self._ckpt(f"{name}.weight")
        if key not in self.source.tensors:
            raise ConversionError(f"no {key} in the checkpoint: cannot embed the calibration text")
        emb.load_state_dict({"weight": self._cast(self.source.get(key))}, strict=False, assign=True)
        chunks = []
        try:
            for ids_chunk in self.split(ids.to(self.device)):
                with torch.no_grad():
                    rec = self._record(0, emb(ids_chunk))
                chunks.append(rec["hidden"].detach())
                kind = self.layer_types[0] if self.layer_types else None
                self._kwargs.setdefault((kind, *ids_chunk.shape, False), (rec["args"], rec["kwargs"]))
        finally:
            emb.load_state_dict(_on_meta(emb), strict=False, assign=True)
        return chunks

    def split(self, x: Tensor) -> list[Tensor]:
        rows = max(1, self.chunk_tokens // x.shape[1])
        return list(torch.split(x, rows))

    @torch.no_grad()
    def run(
        self,
        layer: torch.nn.Module,
        i: int,
        xs: list[Tensor],
        *,
        attn_input: bool = False,
        o_io: bool = False,
        stop: str | None = None,
        received: bool = False,
        attention_output: list[Tensor] | None = None,
    ) -> dict[str, Any]:
        """Run a materialized layer on chunks of hidden states [b, T, D]. Captures the attention input ("A",
        [N, D] float32), the o_proj input and output ("Z" [N, H*d], "Y" [N, D]) and the attention each position
        receives ("W" [H, N], eager attention only); stop="attention" ends each chunk at the attention input,
        stop="o" after the attention module; otherwise the layer outputs come back as "out" (a list of chunks).
        `attention_output` (one tensor per chunk) stands in for the attention module, which is then not run."""
        eager = received and self.skeleton_eager is not None
        if eager:  # the same weights, in the skeleton whose attention hands back its probabilities
            layer = self.layers(self.skeleton_eager)[i]
        attn, o = layer.get_submodule(self.attn_path), layer.get_submodule(self.o_path)
        got: dict[str, list[Tensor]] = {"A": [], "Z": [], "Y": [], "out": [], "W": []}

        def pre_attn(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if attn_input:
                got["A"].append(hidden.reshape(-1, hidden.shape[-1]).float())
            if stop == "attention":
                raise _Stop

        def after_o(_m, args, output):
            got["last_o"] = output
            if o_io:
                got["Z"].append(args[0].reshape(-1, args[0].shape[-1]).float())
                got["Y"].append(output.reshape(-1, output.shape[-1]).float())

        def after_attn(_m, args, output):
            self._attn_width = len(output) if isinstance(output, tuple) else 0
            main = output[0] if isinstance(output, tuple) else output
            last = got.pop("last_o", None)
            if last is not None and not (main is last or torch.equal(main, last)):
                self.o_is_attention_output = False
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if received and probs is not None and probs.dim() == 4:  # [b, H, T, T] (eager attention)
                got["W"].append(probs.float().sum(-2).permute(1, 0, 2).reshape(probs.shape[1], -1))
            if stop == "o":  # o_proj runs inside the attention module
                raise _Stop

        handles = [
            attn.register_forward_pre_hook(pre_attn, with_kwargs=True),
            o.register_forward_hook(after_o),
            attn.register_forward_hook(after_attn),
        ]
        if attention_output is not None:
            layer.set_submodule(self.attn_path, _GivenOutput(attention_output, self._attn_width))
        try:
            for x in xs:
                args, kwargs = self.layer_call(i, x.shape[0], x.shape[1], eager)
                try:
                    out = layer(x, *args, **kwargs)
                    got["out"].append((out[0] if isinstance(out, tuple) else out).detach())
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            if attention_output is not None:
                layer.set_submodule(self.attn_path, attn)
        got.pop("last_o", None)
        cat = {"W": 1, "out": None}
        return {
            k: (torch.cat(v, dim=cat.get(k, 0)) if cat.get(k, 0) is not None else v) if v else None
            for k, v in got.items()
        }
