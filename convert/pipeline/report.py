"""What a conversion did: the report (printed, or --json), the model card and the provenance file beside the
weights."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.version import __version__

if TYPE_CHECKING:
    from convert.pipeline.source import Source

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
    # The commit SOURCE's revision resolved to (a hub id, or a folder of the hub cache); None for other folders.
    source_commit: str | None = None
    push_to_hub: str | None = None  # the hub repository OUTPUT is uploaded to (--push-to-hub)
    pushed: str | None = None  # the URL of the commit that uploaded it

    def as_dict(self) -> dict:
        return asdict(self)


def model_card(report: Report, src: Source) -> str:
    """README.md: metadata through huggingface_hub's ModelCard (base_model, the source's licence), then the text."""
    from convert.hub import card

    title = src.hub_id or Path(src.name).name
    tags = ["gqa-convert", "grouped-query-attention"]
    licence = card.source_license(src.folder, src.raw_config)
    return card.model_card(_card_body(report, src, title), src.hub_id, licence, tags)


def _origin(src: Source) -> str:
    """Where the source came from, for the card: the hub repository at its commit, or the folder."""
    if src.hub_id is None:
        return f"`{src.name}`"
    url = f"https://huggingface.co/{src.hub_id}"
    return f"[`{src.hub_id}`]({url})" + (f" at commit [`{src.commit}`]({url}/tree/{src.commit})" if src.commit else "")


def _card_body(report: Report, src: Source, title: str) -> str:
    return f"""# {title}, {report.kv_heads_after} KV heads

Converted from {_origin(src)} with [gqa-convert](https://pypi.org/project/gqa-convert/) {__version__}:
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
        **{k: v for k, v in report.as_dict().items() if k not in ("tensors_touched", "output", "pushed")},
    }
