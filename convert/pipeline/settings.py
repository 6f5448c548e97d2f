"""The keyword options of `convert_checkpoint`, declared once: the CLI's `convert` flags are built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convert.flags import flag

DTYPE_CHOICES = ("keep", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Settings:
    """How a conversion reads, writes and reports; fields without a flag are set by the caller (progress, the
    method's own options)."""

    dtype: str = flag("keep", "Output dtype of floating tensors.", choices=DTYPE_CHOICES)
    revision: str | None = flag(None, "Hub revision (branch, tag or commit) when SOURCE is a hub id.")
    max_shard_size: str | int = flag("5GB", "Largest output shard, e.g. 2GB, 500MB.")
    seed: int = flag(0, "Seed for the random method and calibration.")
    overwrite: bool = flag(False, "Replace a non-empty OUTPUT.")
    durable: bool = flag(
        False,
        "Put every file on disk before OUTPUT appears, so that even a power loss cannot leave a partial OUTPUT "
        "(waits for the disk; see the benchmark in docs/benchmarks.md).",
        name="fsync",
    )
    dry_run: bool = flag(False, "Print the plan and write nothing.")
    allow_pickle: bool = flag(False, "Accept pickle (*.bin) weights, loaded with weights_only=True.")
    trust_remote_code: bool = flag(False, "Let transformers run code shipped with the config.")
    write_modeling_code: bool = flag(
        False,
        "Where no stock transformers class can hold the KV heads (bloom, mpt, t5, gpt2/opt at 1 < G < H), write "
        "modeling code beside the weights; loading it then needs trust_remote_code=True.",
    )
    progress: bool = True
    method_options: dict[str, Any] | None = None
