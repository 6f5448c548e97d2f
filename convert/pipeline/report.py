"""What a conversion did: the report (printed, or --json), the model card and the provenance file beside the
weights."""

from __future__ import annotations

import datetime
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert.version import __version__

PROVENANCE = "gqa_convert.json"


@dataclass
class Report:
    """What a conversion did (or, with dry_run, would do)."""

    source: str
    output: str
    model_type: str
    method: str
    num_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    dtype: str
    tensors_total: int
    tensors_touched: list[str]
    bytes_in: int
    bytes_out: int
    shards_out: int
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    dry_run: bool
    per_layer: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # How the output is stored and loaded: "as is" (the source's class), a stock route, or "shipped code".
    route: str = "as is"
    output_model_type: str = ""
    load_with: str = "AutoModelForCausalLM.from_pretrained(path): stock transformers, no remote code"

    def as_dict(self) -> dict:
        return asdict(self)


def model_card(report: Report, source_name: str) -> str:
    base = source_name if re.fullmatch(r"[\w.-]+/[\w.-]+", source_name) else Path(source_name).name
    return f"""---
base_model: {base}
tags:
- gqa-convert
- grouped-query-attention
library_name: transformers
---

# {base}, {report.kv_heads_after} KV heads

Converted from `{source_name}` with [gqa-convert](https://pypi.org/project/gqa-convert/) {__version__}:
multi-head / grouped-query attention with {report.kv_heads_before} KV heads became
{"multi-query" if report.kv_heads_after == 1 else "grouped-query"} attention with {report.kv_heads_after} KV heads
({report.num_heads} query heads, head_dim {report.head_dim}).

| | before | after |
|---|---|---|
| KV heads | {report.kv_heads_before} | {report.kv_heads_after} |
| KV cache per token | {report.kv_cache_bytes_per_token_before:,} B | {report.kv_cache_bytes_per_token_after:,} B |

- method: `{report.method}`
- dtype: `{report.dtype}`
- details and per-layer statistics: `{PROVENANCE}`

{_load_line(report)} A converted model has lost some
quality; uptraining (`recipes/uptrain.py` in gqa-convert) wins most of it back.
{_route_card(report)}"""


def _route_card(report: Report) -> str:
    """The model card's paragraph on a stock re-expression route (empty otherwise)."""
    if report.route in ("as is", "shipped code"):
        return ""
    return (
        f"\nThe source is `{report.model_type}`, whose transformers class has no KV-head count: it was re-expressed "
        f"as `{report.output_model_type}` (route `{report.route}`), a stock class that computes the same function "
        f"and can hold {report.kv_heads_after} KV heads. Load: {report.load_with}.\n"
    )


def _load_line(report: Report) -> str:
    for note in report.notes:
        if note.startswith("route: modeling code"):  # the shipped-code route: the note ends with how to load it
            return f"It ships its own modeling code: {note.rsplit('; ', 1)[-1]}."
    return f"Load it with stock transformers: `{report.load_with.split(':')[0]}`."


def provenance(report: Report, settings: dict[str, Any]) -> dict:
    """The contents of gqa_convert.json: tool, version, time, settings, and the report (less the long lists)."""
    return {
        "tool": "gqa-convert",
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        **{k: v for k, v in report.as_dict().items() if k not in ("tensors_touched", "output")},
    }
