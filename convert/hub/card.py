"""The model card of a converted checkpoint, written through huggingface_hub's `ModelCard` and `ModelCardData`, so
that its metadata is what the hub validates: `base_model` (the source's hub id, when it has one), the source's
`license` (with `license_name`/`license_link` for `other`), tags, `library_name`."""

from __future__ import annotations

import contextlib
import importlib
import threading
from pathlib import Path
from typing import Any

LICENSE_KEYS = ("license", "license_name", "license_link")


def preload() -> None:
    """Start importing huggingface_hub's card classes on a thread: the import takes 0.1-0.3 s (it brings the hub
    client with it), and a conversion writes its card only after the shards, so the import overlaps them."""

    def run() -> None:
        with contextlib.suppress(Exception):  # the card's own import raises it again, in the caller's thread
            importlib.import_module("huggingface_hub.repocard")

    threading.Thread(target=run, name="gqa-import-card", daemon=True).start()


def source_license(folder: Path, raw_config: dict) -> dict[str, Any]:
    """The source's licence as card metadata: from its own model card (README.md front matter) when it says, else
    from config.json's `license` key; empty when neither does."""
    readme = folder / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
        except Exception:  # a card whose front matter is not YAML says nothing usable about the licence
            data = {}
        found = {k: data[k] for k in LICENSE_KEYS if data.get(k)}
        if found:
            return found
    license = raw_config.get("license")
    return {"license": license} if isinstance(license, str) and license else {}


def model_card(body: str, base_model: str | None, license: dict[str, Any], tags: list[str]) -> str:
    """The README.md text: the metadata block as huggingface_hub writes it, then `body`."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, library_name="transformers", tags=tags, **license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.lstrip()}").content
