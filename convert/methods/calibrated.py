"""The calibrated method: closed-form, rotary-exact merging of KV heads fitted on calibration text, layer by layer
(the math: `convert.methods.linalg`; running the layers: `convert.methods.runner`).

Each layer is fitted on the hidden states the *converted* model computes (earlier layers' errors included),
against what the original layer outputs on those same states. With stream "both" (default) the original model's
hidden states are carried along too, and the o refit also takes back `drift` times the difference of the two
residual streams; `input_correction` maps the converted attention inputs that much towards the original ones
(least squares) before merging. Stream "converted" skips the original stream (cheaper); "original" fits every
layer on the original model's hidden states instead.

Calibration computes in float32 by default: on CPUs without native bfloat16 a bfloat16 forward is several times
slower than a float32 one, and float32 rounds less. Statistics are accumulated in float32 and solved in float64.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from convert.errors import ConversionError
from convert.families import Attention, output_shapes
from convert.families.mha import MhaFamily
from convert.figures import new_figure, save_figure
from convert.methods.base import Method, permute_kv_heads
from convert.methods.flags import CALIBRATION_DTYPES, GROUPINGS
from convert.methods.grouping import similarity_order
from convert.methods.linalg import (
    LayerMath,
    correct_inputs,
    input_correction,
    merge_layer,
    refit_o,
    rotary_pairs,
    second_moment,
    slow_share,
)
from convert.methods.reconstruct import layer_attention, reconstruct_attention
from convert.methods.runner import LayerRunner, template_classes
from convert.methods.text import calibration_ids
from convert.pipeline.merge import patched_config

PLOT = "calibration_errors.png"
# Encoder-decoder sources (T5, mT5) get their own calibrator, which builds on this module; named as the method
# registry names classes (imported on first use), so that the two modules do not import each other.
ENCODER_DECODER_CALIBRATOR = "convert.methods.seq2seq:T5Calibrator"
# Relative error of an attention output that only rounding explains, by calibration dtype: below it the o refit is
# not made (the merge was exact; bf16 runs of two different but equivalent layers differ by about 1%).
# Relative key/value error below which a merge counts as exact (float64 rounding is about 1e-12).
EXACT = 1e-8
NOISE_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 0.03, torch.float16: 0.005}


def family_traits(family: Any) -> tuple[bool, bool]:
    """(rotary pairs interleaved, queries and keys normalized per head after the projection) for a family: facts of
    its table row, read in this one place."""
    return family.rotary == "interleaved", bool(family.qk_norm)


class CalibratedOptions(BaseModel):
    """The options of `--method calibrated`, declared once: defaults, bounds and choices (pydantic checks them and
    names the option and the allowed values in its message; unknown options are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration_data: str | None = None  # None: the builtin text; "random": random ids; else a data source
    calibration_tokens: int = Field(8192, ge=2)
    calibration_seq_len: int = Field(512, ge=1)
    grouping: Literal[GROUPINGS] = "contiguous"
    stream: Literal["both", "converted", "original"] = "both"
    drift: float = Field(0.2, ge=0, le=1)
    input_correction: float = Field(0.3, ge=0, le=1)
    refit_o: bool = True
    ridge: float = Field(0.04, ge=0)
    calibration_dtype: Literal[CALIBRATION_DTYPES] = "float32"
    key_centering: Literal["global", "sequence", "none"] = "global"
    key_weighting: float = Field(0.5, ge=0, le=1)
    value_weighting: float = Field(0.5, ge=0, le=1)
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (cuda when there is one)
    # Block-wise reconstruction after the closed form (`convert.methods.reconstruct`): 0 passes = off.
    reconstruct_epochs: float = Field(0.0, ge=0, le=100)
    reconstruct_lr: float = Field(1e-4, gt=0, le=1)
    reconstruct_batch: int = Field(1, ge=1)

    @classmethod
    def parse(cls, options: dict[str, Any], method: str = "calibrated") -> CalibratedOptions:
        """Options as given (None = default), or a ConversionError naming each bad option and what it accepts."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise ConversionError(f"method {method!r} has no option(s) {unknown}; it knows {sorted(cls.model_fields)}")
        try:
            return cls(**given)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err['input']!r})" for err in e.errors()
            )
            raise ConversionError(f"method {method!r}: {problems}") from None

    def torch_device(self) -> torch.device:
        """The device calibration runs on; a CUDA device that is not there is refused with the fix."""
        want = self.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(want)
        except RuntimeError:
            raise ConversionError(f"--device {self.device!r}: use cpu, cuda, cuda:N or auto") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConversionError(f"--device {self.device}: no CUDA device is available here; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise ConversionError(f"--device {self.device!r}: use cpu, cuda, cuda:N or auto")
        return device


@dataclass
class LayerCalibration:
    """What `Calibrated.merge` gets for one layer: the statistics, and `finish` (re-fit o_proj, move on)."""

    layer: int
    math: LayerMath
    grouping: str
    finish: Callable[..., tuple[Attention, dict]]  # (layer, merged, exact=False) -> (merged, statistics)


class Calibrator:
    """Walks the layers in order, keeping calibration activations, one materialized layer at a time."""

    def __init__(self, source: Any, groups: int, seed: int, opts: CalibratedOptions):
        self.src, self.groups, self.opts = source, groups, opts
        self.stream = opts.stream
        self.drift = opts.drift if opts.stream == "both" else 0.0
        self.input_correction = opts.input_correction if opts.stream == "both" else 0.0
        self.weighting = (opts.key_weighting, opts.value_weighting)
        self.s_out = output_shapes(source.shapes, groups, source.raw_config, source.family)
        self.present = set(source.tensors)
        self.dtype = getattr(torch, opts.calibration_dtype)
        self.device = opts.torch_device()
        self.model_type = source.raw_config.get("model_type")
        interleaved, self.qk_norm_family = family_traits(source.family)
        self.pairs = rotary_pairs(source.shapes.rotary_dim, interleaved)
        new_config, classes = merged_configs(source, groups)
        # A shipped-code source (gqa_<x>) is read with the template's config class: `source.config` would need the
        # checkpoint's own code, so it must not be evaluated as a default.
        base_config = classes["source_config"] if "source_config" in classes else source.config  # noqa: SIM401
        vocab = int(getattr(base_config, "vocab_size", 0) or 0)
        ids, where = calibration_ids(
            getattr(source, "folder", None),
            opts.calibration_data,
            opts.calibration_tokens,
            min(opts.calibration_seq_len, position_limit(source.raw_config)),
            seed,
            vocab,
        )
        self.seq_len = int(ids.shape[1])
        self.context = max(1, self.seq_len // 2)  # mean causal context of a calibration sequence
        # Eager attention hands back its probabilities: needed for the attention-weighted moments.
        self.runner = LayerRunner(source, new_config, self.dtype, self.device, eager=max(self.weighting) > 0, **classes)
        self.inv_freq = None
        if opts.key_centering != "none":
            self.inv_freq = next(
                (b.cpu() for n, b in self.runner.skeleton.named_buffers() if n.endswith("inv_freq")), None
            )
        x0 = self.runner.embed(ids)
        self.x_orig = x0 if self.stream in ("original", "both") else None
        self.x_new = x0 if self.stream in ("converted", "both") else None
        self.pending: dict[str, Any] = {}
        self.summary = {
            "calibration_data": where,
            "calibration_tokens": int(ids.numel()),
            "calibration_sequences": int(ids.shape[0]),
            "calibration_seq_len": self.seq_len,
            **fit_summary(opts, self.device, self.drift, self.input_correction),
            "reconstruct_epochs": opts.reconstruct_epochs,
            "reconstruct_lr": opts.reconstruct_lr,
            "reconstruct_batch": opts.reconstruct_batch,
        }

    def _tensors(self, i: int) -> dict[str, Tensor]:
        """Layer i's tensors, read from the checkpoint now (names relative to the layer)."""
        p = f"{self.runner.layer_prefix}{i}."
        return {k[len(p) :]: self.src.get(k) for k in self.src.tensors if k.startswith(p)}

    def _qk_norm(self, i: int) -> bool:
        fam = self.src.family
        p = fam.prefix.format(i=i)
        keys = fam.attention_keys(i, self.present)
        return self.qk_norm_family or any(k in keys for k in (f"{p}{fam.q_norm}.weight", f"{p}{fam.k_norm}.weight"))

    def __call__(self, i: int) -> dict:
        """Statistics of layer i (the original layer runs here); `finish` then merges on and moves the streams."""
        tensors = self._tensors(i)
        run, layer = self.runner.run, self.runner.load(False, i, tensors)
        recv, nxt, A_orig = max(self.weighting) > 0, None, None
        if self.stream == "original":
            r = run(layer, i, self.x_orig, attn_input=True, o_io=True, received=recv)
            nxt = r["out"]
        else:
            if self.stream == "both":
                r0 = run(layer, i, self.x_orig, attn_input=self.input_correction > 0)
                nxt, A_orig = r0["out"], r0["A"]
            r = run(layer, i, self.x_new, attn_input=True, o_io=True, stop="o", received=recv)
        self.runner.unload(False, i)
        A, Y = r["A"], r["Y"]
        floor = NOISE_FLOOR[self.dtype]
        # Streams that agree within rounding (exact merges so far) need no correction, and get none.
        if self.drift and _apart(self.x_orig, self.x_new) > floor:
            diff = torch.cat([(a - b).reshape(-1, a.shape[-1]) for a, b in zip(self.x_orig, self.x_new)])
            Y = Y + self.drift * diff.float()
        bias = tensors.get(f"{self.runner.o_path}.bias")
        if bias is not None:
            Y = Y - bias.float().to(Y.device)
        self.pending = {"layer": i, "Y": Y, "next_orig": nxt, "tensors": tensors}
        C = second_moment(A)
        moment = self._moment(A, r["W"]) if recv and r.get("W") is not None else None
        correction = None
        if A_orig is not None and _apart([A_orig], [A]) > floor:
            correction = input_correction(A, A_orig, C, self.input_correction)
        lm = LayerMath(
            C,
            self.pairs,
            self._qk_norm(i),
            slow_share(self.inv_freq, len(self.pairs[0]), self.context),
            self._means(A, torch.ones(A.shape[0], device=A.device)),
            moment,
            *self.weighting,
            correction,
        )
        return {"calibration": LayerCalibration(i, lm, self.opts.grouping, self.finish)}

    def _means(self, A: Tensor, w: Tensor) -> Tensor | None:
        """U [D+1, r] with U U^T the (w-weighted) moment of the means the softmax may ignore: the global mean of
        [A 1], or the mean of each calibration sequence."""
        if self.opts.key_centering == "none":
            return None
        T = A.shape[0] if self.opts.key_centering == "global" else self.seq_len
        # float64: the key metric subtracts these means' moment from C, and on dims whose mean dominates (massive
        # activations) float32 sums would leave more error than the variance that remains.
        ws = w.double().reshape(-1, 1, T)  # [r, 1, T]
        tot = ws.sum((1, 2)).clamp_min(1e-300)  # [r]
        sums = torch.bmm(ws, A.double().reshape(-1, T, A.shape[1]))[:, 0]  # [r, D]
        mean = torch.cat([sums / tot[:, None], torch.ones_like(tot)[:, None]], dim=1)  # [r, D+1]: mean of [A 1]
        return (mean * tot.sqrt()[:, None]).T.cpu()

    def _moment(self, A: Tensor, W: Tensor) -> Callable[[list[int]], tuple[Tensor, Tensor | None]]:
        """Second moments weighted by the attention each position receives from a group's query heads: keys and
        values of the positions attention reads most (the first token of a sequence, typically) count for what
        they weigh in the attention output."""
        Hkv = self.src.shapes.num_kv_heads
        w_kv = W.reshape(Hkv, W.shape[0] // Hkv, -1).mean(1)  # [Hkv, N], mean 1 per position
        cache: dict[tuple[int, ...], tuple[Tensor, Tensor | None]] = {}

        def moment(heads: list[int]) -> tuple[Tensor, Tensor | None]:
            key = tuple(sorted(heads))
            if key not in cache:
                w = w_kv[list(key)].mean(0)
                cache[key] = (second_moment(A, w), self._means(A, w))
            return cache[key]

        return moment

    def _load_new(self, i: int, att: Attention) -> torch.nn.Module:
        keys = self.src.family.attention_keys(i, self.present)
        start = len(self.runner.layer_prefix) + len(str(i)) + 1
        tensors = dict(self.pending["tensors"])
        for key, t in self.src.family.join(i, att, keys, self.s_out).items():
            tensors[key[start:]] = t
        return self.runner.load(True, i, tensors)

    def _reconstruct(
        self, i: int, merged: Attention, x_in: list[Tensor], stats_before: float
    ) -> tuple[Attention, dict]:
        """Tune the merged layer's attention projections against the o re-fit's target (block-wise
        reconstruction), and read them back in per-head form. The tuned layer stays materialized."""
        layer = self._load_new(i, merged)
        fam = self.src.family
        keys = fam.attention_keys(i, self.present)
        start = len(self.runner.layer_prefix) + len(str(i)) + 1
        names = [k[start:] for k in keys]
        Y = self.pending["Y"]
        bias = self.pending["tensors"].get(f"{self.runner.o_path}.bias")
        if bias is not None:  # the target is without o's bias; the module's output has it
            Y = Y + bias.float().to(Y.device)
        stats = reconstruct_attention(
            self.runner,
            layer,
            i,
            x_in,
            Y,
            names,
            self.opts.reconstruct_epochs,
            self.opts.reconstruct_lr,
            seed=i,
            batch=self.opts.reconstruct_batch,
        )
        if stats["attn_rel_err_reconstructed"] >= stats_before:
            # Never worse than the closed form on its own objective: then the closed form is kept.
            stats["reconstruct_kept"] = False
            self._load_new(i, merged)
            return merged, stats
        stats["reconstruct_kept"] = True
        tuned = layer_attention(layer, names)
        return fam.split(i, lambda k: tuned[k[start:]], keys, self.s_out), stats

    def finish(self, i: int, merged: Attention, exact: bool = False) -> tuple[Attention, dict]:
        """Re-fit o_proj (and reconstruct the layer unless the merge was `exact`), then move the streams on."""
        if self.pending.get("layer") != i:
            raise RuntimeError(f"calibration context of layer {i} was not prepared (layers must come in order)")
        stats: dict = {}
        layer = self._load_new(i, merged)
        x_in = self.x_orig if self.stream == "original" else self.x_new
        given = None
        if self.opts.refit_o:
            Z = self.runner.run(layer, i, x_in, o_io=True, stop="o")["Z"]
            merged, stats = refit_o(merged, Z, self.pending["Y"], self.opts.ridge, NOISE_FLOOR[self.dtype])
            if self.stream != "original" and self.runner.o_is_attention_output:
                # the attention output with the new o_proj, without recomputing it
                D, H, d = merged.o.shape
                bias = self.pending["tensors"].get(f"{self.runner.o_path}.bias")
                O = merged.o.reshape(D, H * d).to(Z.device)
                y = Z @ O.T + (0 if bias is None else bias.float().to(Z.device))
                sizes = [x.shape[0] * x.shape[1] for x in self.x_new]
                given = [c.reshape(x.shape).to(x.dtype) for c, x in zip(torch.split(y, sizes), self.x_new)]
            else:
                layer = self._load_new(i, merged)
        # An exact merge is left as it is: the error left is rounding, and fitting it would move weights off it.
        if (
            self.opts.reconstruct_epochs > 0
            and not exact
            and stats.get("attn_rel_err", math.inf) > NOISE_FLOOR[self.dtype]
        ):
            merged, more = self._reconstruct(i, merged, x_in, stats.get("attn_rel_err", math.inf))
            stats.update(more)
            layer, given = self.runner.layers(self.runner.skeleton_new)[i], None
        if self.stream != "original":
            self.x_new = self.runner.run(layer, i, self.x_new, attention_output=given)["out"]
        self.runner.unload(True, i)
        if self.stream != "converted":
            self.x_orig = self.pending["next_orig"]
        self.pending = {}
        return merged, stats


def fit_summary(opts: CalibratedOptions, device: torch.device, drift: float, correction: float) -> dict[str, Any]:
    """The fitting options a calibration records in its provenance (decoder and encoder-decoder alike); drift and
    input correction as applied (0 on one stream)."""
    return {
        "calibration_dtype": opts.calibration_dtype,
        "device": str(device),
        "grouping": opts.grouping,
        "stream": opts.stream,
        "drift": drift,
        "input_correction": correction,
        "refit_o": opts.refit_o,
        "ridge": opts.ridge,
        "key_centering": opts.key_centering,
        "key_weighting": opts.key_weighting,
        "value_weighting": opts.value_weighting,
    }


def position_limit(raw: dict) -> int:
    """The longest sequence the model takes: learned position tables (gpt2, opt, gpt_bigcode) have no row beyond
    it, and calibrating past the trained context would fit the merge to positions the model never sees."""
    for key in ("n_positions", "max_position_embeddings", "max_seq_len"):
        if isinstance(raw.get(key), int) and raw[key] > 0:
            return raw[key]
    return 1 << 30


def merged_configs(source: Any, groups: int) -> tuple[Any, dict]:
    """The merged model's config and the runner's class settings. A source whose output ships modeling code (or
    that is such an output) runs in the template's classes, from the package's own files: the original at its
    current KV count, the merged model at G."""

    fam = source.family
    if not isinstance(fam, MhaFamily):
        return patched_config(source.config, fam, groups), {}
    config_class, model_class = template_classes(fam.template)
    raw = {k: v for k, v in source.raw_config.items() if k not in ("auto_map", "model_type", "architectures")}

    def config(kv: int) -> Any:
        return config_class.from_dict({**raw, fam.kv_key: kv})

    return config(groups), {"source_config": config(source.shapes.num_kv_heads), "model_class": model_class}


def _apart(xs: list[Tensor] | None, ys: list[Tensor] | None) -> float:
    """Relative distance of two chunked streams."""
    if xs is None or ys is None:
        return 0.0
    num = sum(float(torch.linalg.vector_norm(x - y, dtype=torch.float32)) ** 2 for x, y in zip(xs, ys))
    den = sum(float(torch.linalg.vector_norm(x, dtype=torch.float32)) ** 2 for x in xs)
    return math.sqrt(num / max(den, 1e-300))


class Calibrated(Method):
    """Closed-form merge fitted on calibration text, rotary-exact on keys, compensation folded into q_proj/o_proj."""

    name = "calibrated"
    summary = "calibrated PCA merge: rotary-exact complex key merge folded into q_proj, values folded into o_proj"
    needs_calibration = True

    def __init__(self) -> None:
        self.calibrator: Any = None  # a Calibrator, or a T5Calibrator (convert.methods.seq2seq)
        self.info: dict = {}

    options_class: type[CalibratedOptions] = CalibratedOptions

    def layer_contexts(self, source: Any, groups: int, seed: int, **options: Any) -> Callable[[int], dict] | None:
        opts = self.options_class.parse(options, self.name)
        self.calibrator, self.info = None, {"started": time.perf_counter()}
        if groups == source.shapes.num_kv_heads:
            self.info["summary"] = {"note": "G equals the current KV-head count: nothing to merge, weights unchanged"}
            return None
        if source.raw_config.get("is_encoder_decoder"):  # T5, mT5: the decoder's self- and cross-attention
            module, name = ENCODER_DECODER_CALIBRATOR.split(":")
            self.calibrator = getattr(importlib.import_module(module), name)(source, groups, seed, opts)
        else:
            self.calibrator = Calibrator(source, groups, seed, opts)
        return self.calibrator

    def merge(
        self,
        att: Attention,
        groups: int,
        *,
        layer: int,
        seed: int,
        calibration: LayerCalibration | None = None,
        **context: Any,
    ) -> tuple[Attention, dict]:
        if groups == att.num_kv_heads:
            return att, {"k_rel_err": 0.0, "v_rel_err": 0.0}
        if calibration is None:
            raise ConversionError(
                "method 'calibrated' needs calibration statistics: run it through convert_checkpoint "
                "(gqa-convert convert --method calibrated), which calibrates layer by layer"
            )
        order = list(range(att.num_kv_heads))
        lm = calibration.math
        if calibration.grouping == "similarity":
            order = similarity_order(att, groups, lm)
            if order != sorted(order):
                att = permute_kv_heads(att, order)
                if lm.moment is not None:
                    lm = replace(lm, moment=lambda heads, f=lm.moment: f([order[h] for h in heads]))
        if lm.correction is not None:
            att = correct_inputs(att, lm.correction, ("q", "k", "v") if lm.C_kv is None else ("q",))
        merged, stats = merge_layer(att, groups, lm)
        # Keys and values reproduced to float64 rounding: what is left of the attention error is the calibration
        # dtype's rounding, not something reconstruction should fit.
        exact = max(stats.get("k_rel_err", 1.0), stats.get("v_rel_err", 1.0)) < EXACT
        merged, more = calibration.finish(layer, merged, exact=exact)
        stats.update(more)
        stats["kv_order"] = order
        stats["key_merge"] = "weighted mean (q/k norm)" if calibration.math.qk_norm else "complex fold"
        return merged, stats

    def finish(self, folder: Path, report: Any) -> None:
        summary = dict(self.calibrator.summary) if self.calibrator else dict(self.info.get("summary", {}))
        summary["time_s"] = round(time.perf_counter() - self.info.get("started", time.perf_counter()), 2)
        rows = [r for r in report.per_layer if "k_rel_err" in r]
        qk = any(r.get("key_merge", "").startswith("weighted") for r in rows)
        summary["key_merge"] = summary.get("key_merge") or (  # a calibrator may say it itself (T5)
            "approximate: this family normalizes q/k per head after the projection, which no fold commutes with; "
            "merged keys are the query-energy weighted mean of each group's keys"
            if qk
            else "rotary-exact: complex principal component per rotary pair, conjugate folded into q_proj"
        )
        if rows:
            summary["plot"] = PLOT
            plot_errors(
                rows,
                folder / PLOT,
                title=f"{report.source}: {report.kv_heads_before} -> {report.kv_heads_after} KV heads, calibrated",
            )
        path = folder / "gqa_convert.json"
        if path.is_file():
            prov = json.loads(path.read_text())
            prov["calibration"] = summary
            path.write_text(json.dumps(prov, indent=2) + "\n")
        self.calibrator = None  # drop the activations
        self.info["summary"] = summary


def plot_errors(rows: list[dict], path: Path, title: str = "") -> None:
    """PNG of the per-layer reconstruction errors (keys, values, attention output)."""

    rows = sorted(rows, key=lambda r: r["layer"])
    x = [r["layer"] for r in rows]
    fig, ax = new_figure(figsize=(8, 4.5), dpi=110)
    series = [
        ("k_rel_err", "keys"),
        ("v_rel_err", "values"),
        ("attn_rel_err_folded", "attention out (folded o)"),
        ("attn_rel_err", "attention out (o re-fitted)"),
    ]
    for key, label in series:
        if all(key in r for r in rows):
            ax.plot(x, [r[key] for r in rows], marker="o", ms=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error on calibration text")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
