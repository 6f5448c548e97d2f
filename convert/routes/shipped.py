"""Modeling code shipped with a converted checkpoint, for families whose transformers class cannot hold G KV heads.

A template is a folder of package data, `convert/routes/modeling/<template>/`: a `configuration_gqa_<x>.py` and a
`modeling_gqa_<x>.py` that subclass the stock transformers classes and replace only the attention, plus a
`template.json` saying what goes into config.json (`model_type`, `architectures`, `auto_map`, the KV-head key).
Every file of `convert/routes/modeling/common/` is shipped beside them (the attention both use). The templates import
only torch and transformers, never `convert`: they run wherever the checkpoint is loaded.

Loading such a checkpoint runs that code, which transformers does only with `trust_remote_code=True`, so the
converter writes it only when asked (`--write-modeling-code`). The source's own `auto_map` and `*.py` files are
never copied: `auto_map` is replaced, and only the template's files are written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from convert.errors import ConversionError

TEMPLATES = Path(__file__).parent / "modeling"
COMMON = "common"
FLAG = "--write-modeling-code"
# Every method runs on the decoder-only templates (calibrated builds the template's own classes from these files).
# Where a method does not fit a template: why, said in the refusal.
SHIPPED_METHODS = ("mean", "first", "random", "calibrated", "reconstructed")
WEIGHT_ONLY = ("mean", "first", "random")
UNFIT: dict[tuple[str, str], str] = {
    ("t5", "reconstructed"): "its block reconstruction tunes decoder-only layers; T5 has the closed form only "
    "(--method calibrated)",
}


def load_hint(loads_with: str = "AutoModelForCausalLM") -> str:
    return f"{loads_with}.from_pretrained(OUTPUT, trust_remote_code=True)"


def template_manifest(template: str) -> dict:
    """The template's `template.json`: model_type, architectures, auto_map, kv_key, loads_with."""
    path = TEMPLATES / template / "template.json"
    if template == COMMON or not path.is_file():
        known = sorted(p.parent.name for p in TEMPLATES.glob("*/template.json"))
        raise ConversionError(f"no modeling-code template {template!r}: the package has {', '.join(known)}")
    return json.loads(path.read_text())


def template_files(template: str) -> list[Path]:
    """The .py files a template ships: its own and the common ones (no tests, no caches, no manifest)."""
    template_manifest(template)
    return sorted((TEMPLATES / COMMON).glob("*.py")) + sorted((TEMPLATES / template).glob("*.py"))


def require_flag(template: str, write_modeling_code: bool, why: str = "") -> None:
    """Refuse a conversion that needs shipped code unless the user asked for it (a bad input: exit 2)."""
    if write_modeling_code:
        return
    manifest = template_manifest(template)
    hint = load_hint(manifest.get("loads_with", "AutoModelForCausalLM"))
    raise ConversionError(
        f"{why or 'this conversion'} needs modeling code shipped with the checkpoint (model_type "
        f"{manifest['model_type']!r}): no stock transformers class can hold these KV heads, and loading the "
        f"shipped code means trusting it ({hint}). Pass {FLAG} to write it"
    )


def shipped_note(template: str) -> str:
    """The report line that says the route and how to load the output."""
    m = template_manifest(template)
    return (
        f"route: modeling code shipped with the checkpoint (model_type {m['model_type']}, "
        f"{', '.join(m['architectures'])}); load with {load_hint(m.get('loads_with', 'AutoModelForCausalLM'))}"
    )


def check_method(template: str, method: str) -> None:
    """Refuse, before anything is written, a method that cannot run where the output ships this template."""
    model_type = template_manifest(template)["model_type"]
    why = UNFIT.get((template, method))
    if why:
        raise ConversionError(
            f"--method {method} is not available where the output ships its own modeling code ({model_type}): "
            f"{why}. Use --method {', '.join(m for m in SHIPPED_METHODS if (template, m) not in UNFIT)}"
        )
    if method not in SHIPPED_METHODS:
        raise ConversionError(
            f"--method {method} is not available where the output ships its own modeling code ({model_type}): "
            f"use --method {', '.join(SHIPPED_METHODS)}"
        )


def ship_modeling_code(template: str, folder: Path, raw_config: dict, num_kv_heads: int | None = None) -> dict:
    """Copy the template's files into `folder` and return config.json patched to load them.

    The returned config carries the template's `model_type`, `architectures` and `auto_map` (the source's auto_map
    is dropped, never copied) and, when given, the KV-head count under the key the modeling code reads.
    """
    manifest = template_manifest(template)
    folder = Path(folder)
    for f in template_files(template):
        shutil.copyfile(f, folder / f.name)
    raw = {k: v for k, v in raw_config.items() if k != "auto_map"}
    raw["model_type"] = manifest["model_type"]
    raw["architectures"] = list(manifest["architectures"])
    raw["auto_map"] = dict(manifest["auto_map"])
    if num_kv_heads is not None:
        raw[manifest["kv_key"]] = int(num_kv_heads)
    return raw


def shipped_files(folder: Path) -> list[str]:
    """The shipped .py files present in a folder (what the converter wrote), for reports and checks."""
    return sorted(p.name for p in Path(folder).glob("*.py"))
