"""Memory per process, known before compute, and what a run measured: peak memory and MFU.

The estimate is arithmetic on the config (no weights loaded): parameters x bytes for weights, gradients and
AdamW's two moments (sharded by FSDP over the processes, whole under DDP or one process), the activations one
micro-batch keeps for backward (all of them, or only each block's input under gradient checkpointing), the
logits and their loss, and a teacher's weights and logits. On CPU the process's own baseline (the Python runtime,
torch, the tokenized data: RSS measured when the plan is made) is added, since the measured peak is the RSS,
and so is loading: `from_pretrained` holds the whole model beside the memory-mapped checkpoint file it reads
(the largest one), which for a model trained only in part, or one read from a single large file, can be the
peak of the run.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import asdict, dataclass

import torch

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Per token per block, the elements a block keeps for backward, in units of the hidden size and the MLP width
# (q, k, v, the attention output, two norm inputs and outputs, the residual: about 10 H; the gate, up, activation
# and product of a gated MLP: 4 I), counted for llama-style blocks. tests/uptrain/test_memory.py checks the whole
# estimate against the measured peak RSS, but with short rows whose activations are small: these two coefficients
# are the least tested part.
PER_HIDDEN, PER_INTERMEDIATE = 10, 4
LOGIT_COPIES = 4  # logits, their float32 copy for the loss, log-softmax, the gradient of the logits
# Dense peak TFLOP/s per device (bf16/fp16 tensor cores, and plain fp32) from the vendors' data sheets, matched
# against torch.cuda.get_device_name(); a peak_tflops setting replaces them (and is the only way on CPU).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
    "RTX 4090": (165.0, 82.6),
    "RTX 3090": (71.0, 35.6),
}


@dataclass
class MemoryEstimate:
    """Bytes per process, by part; `total` is their sum."""

    baseline: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    logits: int
    teacher: int
    loading: int  # CPU only: the peak while from_pretrained reads the checkpoint(s)
    gradient_checkpointing: bool

    @property
    def training(self) -> int:
        acts = self.activations_checkpointed if self.gradient_checkpointing else self.activations
        return self.baseline + self.weights + self.gradients + self.optimizer + acts + self.logits + self.teacher

    @property
    def total(self) -> int:
        return max(self.training, self.loading)

    def as_dict(self) -> dict:
        return {**asdict(self), "training": self.training, "total": self.total}


def _dim(config, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def shape_of(config) -> dict:
    """Hidden size, MLP width, blocks (encoder plus decoder for T5) and vocabulary of a config, by any name."""
    hidden = _dim(config, "hidden_size", "n_embd", "d_model")
    return {
        "hidden": hidden,
        "intermediate": _dim(config, "intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * hidden),
        "layers": _dim(config, "num_hidden_layers", "n_layer", "num_layers")
        + _dim(config, "num_decoder_layers", default=0),
        "vocab": _dim(config, "vocab_size"),
    }


def rss_now() -> int:
    """This process's resident memory now, in bytes (Linux /proc; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss()


def peak_rss() -> int:
    """This process's peak resident memory since it started, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def estimate_memory(
    config,
    *,
    total_params: int,
    trainable_params: int,
    teacher_params: int,
    teacher_vocab: int,
    model_dtype: str,
    mixed_precision: str | None,
    micro_batch_size: int,
    row_tokens: int,
    processes: int,
    sharded: bool,
    gradient_checkpointing: bool,
    optimizer_bytes_per_param: int = 8,
    baseline: int = 0,
    checkpoint_bytes: int = 0,
    teacher_checkpoint_bytes: int = 0,
    on_cpu: bool = True,
) -> MemoryEstimate:
    """Bytes per process of one run (see the module docstring); `row_tokens` is one training row's tokens."""
    shape, weight_bytes = shape_of(config), BYTES[model_dtype]
    share = processes if sharded and processes > 1 else 1
    # FSDP2 keeps fp32 master copies of what trains under mixed precision (accelerate upcasts them)
    master = 4 if sharded and mixed_precision not in (None, "no") else weight_bytes
    weights = ((total_params - trainable_params) * weight_bytes + trainable_params * master) // share
    gradients = trainable_params * master // share
    optimizer = trainable_params * optimizer_bytes_per_param * master // 4 // share  # two moments, param dtype
    compute_bytes = 2 if mixed_precision in ("bf16", "fp16") else weight_bytes
    tokens = micro_batch_size * row_tokens
    per_block = (PER_HIDDEN * shape["hidden"] + PER_INTERMEDIATE * shape["intermediate"]) * tokens * compute_bytes
    activations = per_block * shape["layers"]
    # checkpointed: each block's input kept, and one block's activations recomputed at a time
    checkpointed = shape["hidden"] * tokens * compute_bytes * shape["layers"] + per_block
    logits = LOGIT_COPIES * tokens * shape["vocab"] * 4
    teacher = 0
    if teacher_params:
        teacher = teacher_params * weight_bytes // share + 2 * tokens * teacher_vocab * 4
    # every process loads the whole model (FSDP shards it afterwards), beside the mapped pages of the file it reads
    loading = 0
    if on_cpu:
        loading = baseline + total_params * weight_bytes + checkpoint_bytes
        if teacher_params:
            loading += teacher_params * weight_bytes + teacher_checkpoint_bytes
    return MemoryEstimate(
        baseline=baseline,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        activations_checkpointed=checkpointed,
        logits=logits,
        teacher=teacher,
        loading=loading,
        gradient_checkpointing=gradient_checkpointing,
    )


def checkpoint_bytes(folder: str) -> int:
    """The bytes of a checkpoint's largest weight file: the loader maps one file at a time (a 1.1B llama read
    from 300 MB shards peaked well below its weights plus all its files, tests/uptrain/test_memory.py)."""
    from pathlib import Path

    files = [*Path(folder).glob("*.safetensors")] or [*Path(folder).glob("*.bin")]
    return max((p.stat().st_size for p in files), default=0)


def peak_memory(device: torch.device) -> int:
    """The peak memory this process measured: CUDA max allocated on a GPU, the peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def device_peak_tflops(device: torch.device, mixed_precision: str | None, setting: float | None) -> float | None:
    """The peak TFLOP/s of one device: the setting, else the table for a known GPU, else None (unknown)."""
    if setting is not None:
        return setting
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, full) in PEAK_TFLOPS.items():
        if key in name:
            return half if mixed_precision in ("bf16", "fp16") else full
    return None


def mfu(flops_per_token: float, tokens_per_s: float | None, peak_tflops: float | None, processes: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all the devices."""
    if not tokens_per_s or not peak_tflops:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * processes)
