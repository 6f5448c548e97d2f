"""`--method calibrated` on T5 (and mT5): the calibrated merge of the decoder's self- and cross-attention.

The converter walks T5's decoder attention modules in order (index 2b: block b's self-attention, 2b+1: its
cross-attention; `convert.families.t5`). This calibrator answers each index with the same `LayerCalibration` as the
decoder-only one (`convert.methods.calibrated.Calibrator`), so the merge math, the o re-fit and the statistics are
the same code:

    calibration text   span corruption (`convert.text.span_corruption`) of the calibration text, as T5 is trained
                       and uptrained: the encoder reads corrupted runs, the decoder the shifted targets
    encoder            run once, block by block (it is not merged): its output E is the key/value input of every
                       cross-attention, in both streams
    self-attention     keys read the queries' input: the decoder-only math as it is (T5 has no rotary, so every
                       key dim is merged by a full linear map weighted by the query covariance)
    cross-attention    keys and values are fitted in E's second moment (`LayerMath.C_kv`), queries weigh them in the
                       decoder stream's; the input correction moves only the queries (E is the same in both streams)
    streams            the decoder's residual streams (converted and, with stream "both", original) move on past
                       each attention module and, after the cross-attention, past the block's feed-forward layer

T5 scores attention without 1/sqrt(d) and adds a relative position bias (one column per query head, computed by
block 0 and shared): both pass through the merge untouched. Grouping by similarity would reorder query heads, which
the shared bias does not follow, so it is refused; so is block reconstruction (`--method reconstructed`).

One decoder block (and one encoder block while the encoder runs) is materialized at a time, in the shipped gqa_t5
classes (the original at its KV count, the merged model at G), with eager attention (it returns the probabilities
the attention-weighted moments need).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convert.errors import ConversionError
from convert.families import Attention, output_shapes
from convert.methods.calibrated import (
    NOISE_FLOOR,
    CalibratedOptions,
    LayerCalibration,
    _apart,
    fit_summary,
    merged_configs,
)
from convert.methods.linalg import LayerMath, input_correction, refit_o, rotary_pairs, second_moment
from convert.methods.runner import FREE_HEAP_FLOOR, _on_meta, _Probe, _Stop, release_freed_memory
from convert.methods.text import RANDOM, _tokenizer, calibration_ids
from convert.text.span_corruption import SpanCorruption, SpanCorruptionError, corrupt_stream, sentinel_ids

CHUNK_TOKENS = 4096  # encoder tokens per forward chunk


def span_examples(
    folder: Any, data: str | None, n_tokens: int, input_length: int, seed: int, vocab: int
) -> tuple[Tensor, Tensor, str]:
    """(encoder inputs [B, input_length], decoder targets [B, target_length], where from): span corruption of
    B runs of calibration text, B = n_tokens // (input_length + target_length) (a row costs its inputs and targets,
    as in the uptraining budget). Random ids (no tokenizer): random inputs and random targets of those lengths."""
    try:
        span = SpanCorruption(input_length=input_length)
    except SpanCorruptionError as e:
        raise ConversionError(f"calibration_seq_len={input_length} (the T5 input length): {e}") from None
    per_row = span.input_length + span.target_length
    rows = max(1, n_tokens // per_row)
    if data == RANDOM:
        ids, where = calibration_ids(folder, data, rows * per_row, per_row, seed, vocab)
        return ids[:, : span.input_length], ids[:, span.input_length :], where
    ids, where = calibration_ids(folder, data, rows * span.raw_length, span.raw_length, seed, vocab)
    tokenizer = _tokenizer(folder)
    try:
        sentinels = sentinel_ids(tokenizer, span.num_spans)
    except SpanCorruptionError as e:
        raise ConversionError(f"calibrating T5 with span corruption: {e}; or use --calibration-data random") from None
    inputs, targets = corrupt_stream(
        ids.reshape(-1).numpy().astype(np.int64), span, sentinels, tokenizer.eos_token_id, seed
    )
    where = f"{where}, span corruption (noise density {span.noise_density}, mean span {span.mean_span_length})"
    return torch.from_numpy(inputs), torch.from_numpy(targets), where


def _skeleton(model_class: type, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The model on the meta device (no memory), eager attention; parameters are assigned block by block."""
    with torch.device("meta"):
        model = model_class._from_config(copy.deepcopy(config), dtype=dtype, attn_implementation="eager")
    return model.eval()


def _weights_received(probs: Tensor, queries: int, keys: int) -> Tensor:
    """[b, H, q, k] attention probabilities -> [H, b*k] attention each key position receives, mean 1 per position."""
    return (probs.float().sum(-2) * (keys / queries)).permute(1, 0, 2).reshape(probs.shape[1], -1)


class T5Calibrator:
    """Calibration statistics of T5's decoder attention modules, asked for in order (see the module docstring)."""

    def __init__(self, source: Any, groups: int, seed: int, opts: CalibratedOptions):
        if opts.grouping != "contiguous":
            raise ConversionError(
                "--option grouping=similarity is not available on T5: it reorders query heads, and T5's relative "
                "position bias (one column per query head, shared by every decoder block) does not follow. Use "
                "grouping=contiguous"
            )
        if opts.reconstruct_epochs > 0:
            raise ConversionError(
                "block reconstruction (--method reconstructed, reconstruct_epochs > 0) is not available on T5: "
                "use --method calibrated"
            )
        self.src, self.groups, self.opts = source, groups, opts
        self.stream = opts.stream
        self.drift = opts.drift if opts.stream == "both" else 0.0
        self.input_correction = opts.input_correction if opts.stream == "both" else 0.0
        self.weighting = (opts.key_weighting, opts.value_weighting)
        self.recv = max(self.weighting) > 0
        self.s_out = output_shapes(source.shapes, groups, source.raw_config, source.family)
        self.present = set(source.tensors)
        self.dtype = getattr(torch, opts.calibration_dtype)
        self.device = opts.torch_device()
        self.floor = NOISE_FLOOR[self.dtype]
        self.pairs = rotary_pairs(0)  # relative position bias, no rotary: every key dim is a full linear map
        new_config, classes = merged_configs(source, groups)
        config = classes["source_config"]
        self.skeleton = _skeleton(classes["model_class"], config, self.dtype)
        self.skeleton_new = _skeleton(classes["model_class"], new_config, self.dtype)
        inputs, targets, where = span_examples(
            getattr(source, "folder", None),
            opts.calibration_data,
            opts.calibration_tokens,
            opts.calibration_seq_len,
            seed,
            int(config.vocab_size),
        )
        start = config.decoder_start_token_id or 0
        dec_ids = torch.cat([torch.full_like(targets[:, :1], start), targets[:, :-1]], dim=1)
        rows = max(1, CHUNK_TOKENS // inputs.shape[1])
        self.enc_len, self.dec_len = int(inputs.shape[1]), int(dec_ids.shape[1])
        embed = self._tensor("shared.weight", "encoder.embed_tokens.weight")
        enc_x = [embed[c.to(self.device)] for c in torch.split(inputs, rows)]
        dec_x = [embed[c.to(self.device)] for c in torch.split(dec_ids, rows)]
        del embed
        self.enc_out = self._encode(enc_x)
        self.E = torch.cat([e.reshape(-1, e.shape[-1]) for e in self.enc_out]).float()
        self.C_E = second_moment(self.E)
        self.E_means = self._means(self.E, None, self.enc_len)
        self.x_orig = dec_x if self.stream in ("original", "both") else None
        self.x_new = dec_x if self.stream in ("converted", "both") else None
        self.masks = self._record(self.skeleton.decoder, dec_x[0].shape[0], self.dec_len, self.enc_len)
        self.pos_bias: Tensor | None = None  # decoder self-attention bias, computed by block 0
        self.pending: dict[str, Any] = {}
        self.summary = {
            "calibration_data": where,
            "calibration_tokens": int(inputs.numel() + targets.numel()),
            "calibration_sequences": int(inputs.shape[0]),
            "calibration_seq_len": self.enc_len,
            "calibration_target_len": self.dec_len,
            **fit_summary(opts, self.device, self.drift, self.input_correction),
            "encoder_decoder": "encoder run once; decoder self- and cross-attention merged, encoder kept",
            "key_merge": "no rotary (relative position bias): a full linear map per group, weighted by the query "
            "covariance, folded into q; cross-attention keys and values fitted on the encoder output",
        }

    # --- materializing ------------------------------------------------------------------------------------------

    def _tensor(self, *names: str) -> Tensor:
        for name in names:
            if name in self.present:
                return self._cast(self.src.get(name))
        raise ConversionError(f"the checkpoint has none of {list(names)}: cannot calibrate this T5 checkpoint")

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def _load(self, module: torch.nn.Module, prefix: str, override: dict[str, Tensor] | None = None) -> None:
        """Assign the checkpoint's tensors under `prefix` (and `override`, checkpoint names) to `module`."""
        tensors = {k[len(prefix) :]: k for k in self.present if k.startswith(prefix)}
        wanted = {n for n, _ in module.named_parameters()}
        missing = sorted(wanted - set(tensors))
        if missing:
            raise ConversionError(f"{prefix}: the checkpoint lacks {missing} that the model class needs")
        override = override or {}
        state = {
            n: self._cast(override[k] if k in override else self.src.get(k)) for n, k in tensors.items() if n in wanted
        }
        module.load_state_dict(state, strict=False, assign=True)

    def _unload(self, *modules: torch.nn.Module) -> None:
        size = 0
        for m in modules:
            size = max(size, sum(p.numel() * p.element_size() for p in m.parameters()))
            m.load_state_dict(_on_meta(m), strict=False, assign=True)
        release_freed_memory(keep=max(size, FREE_HEAP_FLOOR))

    def _record(self, stack: torch.nn.Module, batch: int, length: int, enc_length: int | None = None) -> tuple:
        """The mask arguments the stack's forward hands its first block (nothing but masks is computed)."""
        blocks = stack.block
        first = blocks[0]
        record: dict = {}
        kwargs: dict[str, Any] = {"inputs_embeds": torch.zeros(batch, length, stack.config.d_model, dtype=self.dtype)}
        if enc_length is not None:
            kwargs["encoder_hidden_states"] = torch.zeros(batch, enc_length, stack.config.d_model, dtype=self.dtype)
        blocks[0] = _Probe(first, record)
        try:
            stack(**{k: v.to(self.device) for k, v in kwargs.items()}, use_cache=False)
        except _Stop:
            pass
        finally:
            blocks[0] = first
        args = record["args"]  # (attention_mask, position_bias, encoder_hidden_states, encoder_mask, ...)
        return args[0], (args[3] if len(args) > 3 else None)

    def _masks(self, masks: tuple, batch: int) -> tuple:
        return tuple(None if m is None else m[:batch] if m.shape[0] > 1 else m for m in masks)

    @torch.no_grad()
    def _encode(self, xs: list[Tensor]) -> list[Tensor]:
        """The encoder's output for every chunk, one block materialized at a time."""
        enc = self.skeleton.encoder
        mask, _ = self._record(enc, xs[0].shape[0], xs[0].shape[1])
        bias: Tensor | None = None
        for j, block in enumerate(enc.block):
            self._load(block, f"encoder.block.{j}.")
            out = []
            for x in xs:
                m = None if mask is None else mask[: x.shape[0]]
                h, pb, _ = block(x, m, bias)
                out.append(h)
                bias = pb if bias is None else bias
            xs = out
            self._unload(block)
        self._load(enc.final_layer_norm, "encoder.final_layer_norm.")  # (dropout: the model is in eval mode)
        xs = [enc.final_layer_norm(x) for x in xs]
        self._unload(enc.final_layer_norm)
        return xs

    # --- one attention module -----------------------------------------------------------------------------------

    def _sublayer(self, model: torch.nn.Module, i: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the layer norm, the attention module) of attention module i of the decoder."""
        layer = model.decoder.block[i // 2].layer[i % 2]
        return layer.layer_norm, layer.EncDecAttention if i % 2 else layer.SelfAttention

    @torch.no_grad()
    def _attend(self, att: torch.nn.Module, i: int, normed: list[Tensor], probs: bool = False) -> dict[str, Any]:
        """Run attention module i on normalized chunks: o's input "Z" [N, H*d], output "Y" [N, D] (float32),
        the output per chunk "out", and the attention each key position receives "W" [H, N_keys]."""
        got: dict[str, list] = {"Z": [], "Y": [], "out": [], "W": []}

        def after_o(_m, args, output):
            got["Z"].append(args[0].reshape(-1, args[0].shape[-1]).float())
            got["Y"].append(output.reshape(-1, output.shape[-1]).float())

        handle = att.o.register_forward_hook(after_o)
        try:
            for c, a in enumerate(normed):
                b = a.shape[0]
                self_mask, cross_mask = self._masks(self.masks, b)
                if i % 2:
                    out, _, w = att(a, mask=cross_mask, key_value_states=self.enc_out[c], position_bias=None)
                else:
                    out, pb, w = att(a, mask=self_mask, position_bias=self.pos_bias)
                    if self.pos_bias is None:  # block 0 computes the relative position bias; every block shares it
                        self.pos_bias = pb
                got["out"].append(out)
                if probs and w is not None:
                    got["W"].append(_weights_received(w, w.shape[-2], w.shape[-1]))
        finally:
            handle.remove()
        return {
            "Z": torch.cat(got["Z"]),
            "Y": torch.cat(got["Y"]),
            "out": got["out"],
            "W": torch.cat(got["W"], dim=1) if got["W"] else None,
        }

    def _means(self, A: Tensor, w: Tensor | None, T: int) -> Tensor | None:
        """U [D+1, r], U U^T the (w-weighted) moment of the means the softmax may ignore (as the decoder-only
        calibrator's `_means`, for a key input of sequences of T positions)."""
        if self.opts.key_centering == "none":
            return None
        w = torch.ones(A.shape[0], device=A.device) if w is None else w
        T = A.shape[0] if self.opts.key_centering == "global" else T
        ws = w.double().reshape(-1, 1, T)
        tot = ws.sum((1, 2)).clamp_min(1e-300)
        sums = torch.bmm(ws, A.double().reshape(-1, T, A.shape[1]))[:, 0]
        mean = torch.cat([sums / tot[:, None], torch.ones_like(tot)[:, None]], dim=1)
        return (mean * tot.sqrt()[:, None]).T.cpu()

    def _moment(self, K: Tensor, W: Tensor, T: int):
        """Moments of the key input K weighted by the attention each position receives from a group's queries."""
        Hkv = self.src.shapes.num_kv_heads
        w_kv = W.reshape(Hkv, W.shape[0] // Hkv, -1).mean(1)
        cache: dict[tuple[int, ...], tuple[Tensor, Tensor | None]] = {}

        def moment(heads: list[int]) -> tuple[Tensor, Tensor | None]:
            key = tuple(sorted(heads))
            if key not in cache:
                w = w_kv[list(key)].mean(0)
                cache[key] = (second_moment(K, w), self._means(K, w, T))
            return cache[key]

        return moment

    @torch.no_grad()
    def __call__(self, i: int) -> dict:
        """Statistics of decoder attention module i (the original module runs here); `finish` merges on."""
        b, cross = i // 2, bool(i % 2)
        if not cross:  # a new block: the original's tensors for this block (both attention modules, feed-forward)
            self._load(self.skeleton.decoder.block[b], f"decoder.block.{b}.")
        norm, att = self._sublayer(self.skeleton, i)
        x_in = self.x_orig if self.stream == "original" else self.x_new
        normed = [norm(x) for x in x_in]
        r = self._attend(att, i, normed, probs=self.recv)
        A = torch.cat([a.reshape(-1, a.shape[-1]) for a in normed]).float()
        Y, W = r["Y"], r["W"]
        nxt, A_orig = None, None
        if self.stream == "original":
            nxt = [x + o for x, o in zip(self.x_orig, r["out"])]
        elif self.stream == "both":
            normed_orig = [norm(x) for x in self.x_orig]
            r0 = self._attend(att, i, normed_orig)
            nxt = [x + o for x, o in zip(self.x_orig, r0["out"])]
            if self.input_correction > 0:
                A_orig = torch.cat([a.reshape(-1, a.shape[-1]) for a in normed_orig]).float()
        if self.drift and _apart(self.x_orig, self.x_new) > self.floor:
            diff = torch.cat([(a - c).reshape(-1, a.shape[-1]) for a, c in zip(self.x_orig, self.x_new)])
            Y = Y + self.drift * diff.float()
        C = second_moment(A)
        correction = None
        if A_orig is not None and _apart([A_orig], [A]) > self.floor:
            correction = input_correction(A, A_orig, C, self.input_correction)
        if cross:  # keys and values read the encoder's output
            K, T, C_kv, means = self.E, self.enc_len, self.C_E, self.E_means
        else:
            K, T, C_kv, means = A, self.dec_len, None, self._means(A, None, self.dec_len)
        moment = self._moment(K, W, T) if W is not None else None
        lm = LayerMath(C, self.pairs, False, None, means, moment, *self.weighting, correction, C_kv=C_kv)
        self.pending = {"layer": i, "Y": Y, "normed": normed, "next_orig": nxt}
        return {"calibration": LayerCalibration(i, lm, self.opts.grouping, self.finish)}

    @torch.no_grad()
    def finish(self, i: int, merged: Attention, exact: bool = False) -> tuple[Attention, dict]:
        """Re-fit o, move the decoder streams past module i (and past the block's feed-forward after the
        cross-attention)."""
        if self.pending.get("layer") != i:
            raise RuntimeError(f"calibration context of layer {i} was not prepared (layers must come in order)")
        b, stats = i // 2, {}
        fam = self.src.family
        keys = fam.attention_keys(i, self.present)
        prefix = fam.prefix.format(i=i)
        _, att_new = self._sublayer(self.skeleton_new, i)
        self._load(att_new, prefix, fam.join(i, merged, keys, self.s_out))
        if self.stream != "original":
            Z = self._attend(att_new, i, self.pending["normed"])["Z"]
            if self.opts.refit_o:
                merged, stats = refit_o(merged, Z, self.pending["Y"], self.opts.ridge, self.floor)
            D, H, d = merged.o.shape
            y = Z @ merged.o.reshape(D, H * d).to(Z.device).T
            sizes = [x.shape[0] * x.shape[1] for x in self.x_new]
            self.x_new = [x + c.reshape(x.shape).to(x.dtype) for c, x in zip(torch.split(y, sizes), self.x_new)]
        elif self.opts.refit_o:
            Z = self._attend(att_new, i, self.pending["normed"])["Z"]
            merged, stats = refit_o(merged, Z, self.pending["Y"], self.opts.ridge, self.floor)
        self._unload(att_new)
        if self.stream != "converted":
            self.x_orig = self.pending["next_orig"]
        if i % 2:  # the block's feed-forward layer, the same in both models; then the block is done
            block = self.skeleton.decoder.block[b]
            ff = block.layer[2]
            if self.x_new is not None:
                self.x_new = [ff(x) for x in self.x_new]
            if self.x_orig is not None:
                self.x_orig = [ff(x) for x in self.x_orig]
            self._unload(block)
        self.pending = {}
        return merged, stats
