"""Block-wise reconstruction: a few Adam steps on one merged attention layer, against the original layer.

The closed-form merge (`convert.methods.linalg`) fits keys, values and o_proj one quantity at a time, each from
second moments. What the model needs is the layer's attention output, which depends on all of them at once through
the softmax. So, as post-training quantization does block by block, the merged layer's q/k/v/o projections are then
tuned by gradient descent so that its attention output on the calibration text matches the target the o re-fit
aimed at (the original layer's output, plus the share of the residual-stream drift it takes back).

Cost: one forward and one backward of the attention module per calibration sequence and epoch (the MLP is not run).
The merge stays a stock GQA checkpoint: only the values of existing projections change.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from convert.methods.runner import LayerRunner, _Stop


def _rows(xs: list[Tensor]) -> list[tuple[int, int]]:
    """(chunk, row) of every calibration sequence, in the order the chunks hold them."""
    return [(c, r) for c, x in enumerate(xs) for r in range(x.shape[0])]


def reconstruct_attention(
    runner: LayerRunner,
    layer: torch.nn.Module,
    i: int,
    xs: list[Tensor],
    Y: Tensor,
    names: list[str],
    epochs: float,
    lr: float,
    seed: int = 0,
    batch: int = 1,
) -> dict[str, Any]:
    """Tune the parameters `names` (relative to the layer) of materialized layer i in place so that its o_proj output
    on the chunks `xs` approaches `Y` ([N, D], the chunks' tokens in order). Adam at `lr` (times a cosine decay to
    zero), `batch` sequences a step, `epochs` passes over the sequences in a seeded order. Returns the relative error
    of the attention output on the steps of the last pass (before each step's update)."""
    params = dict(layer.named_parameters())
    missing = sorted(set(names) - set(params))
    if missing:
        raise RuntimeError(f"layer {i}: no parameters {missing} to reconstruct")
    for n, p in params.items():
        p.requires_grad_(n in names)
    trained = [params[n] for n in names]
    o = layer.get_submodule(runner.o_path)
    attn = layer.get_submodule(runner.attn_path)
    seqs = _rows(xs)
    seq_len = xs[0].shape[1]
    # Each sequence's slice of Y: chunk c starts where the chunks before it end.
    starts, at = [], 0
    for x in xs:
        starts.append(at)
        at += x.shape[0] * x.shape[1]
    target = {(c, r): Y[starts[c] + r * seq_len : starts[c] + (r + 1) * seq_len] for c, r in seqs}
    scale = float((Y.double() ** 2).sum(-1).mean())  # mean energy of a target row
    steps = max(1, math.ceil(epochs * len(seqs) / batch))
    opt = torch.optim.Adam(trained, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    order: list[tuple[int, int]] = []
    got: dict[str, Tensor] = {}

    def after_o(_m, _args, output):
        got["y"] = output

    def after_attn(_m, _args, _output):
        raise _Stop  # the MLP is not needed

    handles = [o.register_forward_hook(after_o), attn.register_forward_hook(after_attn)]
    last, last_n = 0.0, 0
    tail = max(1, min(steps, math.ceil(len(seqs) / batch)))
    try:
        with torch.enable_grad():
            for step in range(steps):
                picks = []
                while len(picks) < batch:
                    if not order:
                        order = [seqs[j] for j in torch.randperm(len(seqs), generator=gen).tolist()]
                    picks.append(order.pop())
                x = torch.cat([xs[c][r : r + 1] for c, r in picks])
                y_ref = torch.cat([target[p] for p in picks]).to(x.device)
                args, kwargs = runner.layer_call(i, x.shape[0], x.shape[1])
                with contextlib.suppress(_Stop):  # raised once the attention output is captured
                    layer(x, *args, **kwargs)
                y = got.pop("y").reshape(-1, y_ref.shape[-1]).float()
                loss = ((y - y_ref) ** 2).sum(-1).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step >= steps - tail:
                    last += float(loss.detach()) * y.shape[0]
                    last_n += y.shape[0]
        for p in params.values():
            p.requires_grad_(False)
        # The tuned layer's error on all the calibration text, as the o re-fit measures it: sum of squares over sum.
        err = den = 0.0
        with torch.no_grad():
            for c, r in seqs:
                x = xs[c][r : r + 1]
                args, kwargs = runner.layer_call(i, 1, x.shape[1])
                with contextlib.suppress(_Stop):
                    layer(x, *args, **kwargs)
                y_ref = target[(c, r)].to(x.device)
                err += float(((got.pop("y").reshape(y_ref.shape).float() - y_ref) ** 2).sum())
                den += float((y_ref.double() ** 2).sum())
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.requires_grad_(False)
    return {
        "attn_rel_err_reconstructed": math.sqrt(err / max(den, 1e-300)),
        "attn_rel_err_last_epoch": math.sqrt(last / max(last_n, 1)),
        "reconstruct_steps": steps,
    }


def layer_attention(layer: torch.nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The current values of the parameters `names` (relative to the layer), float32 on the CPU."""
    params = dict(layer.named_parameters())
    return {n: params[n].detach().float().cpu() for n in names}
