"""What FSDP shards as one unit: the model's own blocks, whatever its class.

accelerate's transformer wrap policy takes one list of class names for every model it prepares, and the shipped
configs used to name `LlamaDecoderLayer`, so any other output (phi, gpt_bigcode, nemotron, T5, the shipped-code
classes) failed with "Could not find the transformer layer class". The recipe now decides per model, before any
compute: the `fsdp_wrap` setting if given, else the class names the launcher's config gives, else the model's
`_no_split_modules` (the blocks transformers itself never splits across devices). Every name is checked on the
weightless skeleton, and a wrong one is refused by name with the classes the model does have.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from convert.errors import SettingsError

LAUNCHER_KEY = "FSDP_TRANSFORMER_CLS_TO_WRAP"  # accelerate's variable, from fsdp_transformer_layer_cls_to_wrap


def fsdp_launch() -> bool:
    """Whether `accelerate launch` was given an FSDP config (read from its environment, before any setup)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launcher_classes() -> list[str] | None:
    """The block classes named by the accelerate config (`fsdp_transformer_layer_cls_to_wrap`), if any."""
    value = os.environ.get(LAUNCHER_KEY, "").strip()
    names = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "None"]
    return names or None


def class_counts(model: torch.nn.Module) -> Counter:
    """How many modules of each class the model holds."""
    return Counter(type(m).__name__ for m in model.modules())


def own_blocks(model: torch.nn.Module) -> list[str]:
    """The model's `_no_split_modules` that it actually instantiates (a peft wrapper is looked through)."""
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    present = class_counts(model)
    return [name for name in (getattr(base, "_no_split_modules", None) or []) if present[name]]


def repeated_classes(model: torch.nn.Module) -> list[str]:
    """Candidate block classes for an error message: those found in a ModuleList, most frequent first."""
    found: Counter = Counter()
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList):
            found.update(type(c).__name__ for c in m)
    return [name for name, _ in found.most_common()]


def wrap_classes(
    model: torch.nn.Module, chosen: list[str] | None, role: str = "model", launcher: bool = True
) -> list[str]:
    """The classes FSDP wraps in `model`: `chosen` (the fsdp_wrap setting) or the launcher's names (when
    `launcher`), each checked to exist in the model; else the model's own blocks. Raises SettingsError naming the
    classes the model does have."""
    present = class_counts(model)
    candidates = ", ".join(repeated_classes(model)) or "none"
    source, names = "fsdp_wrap", chosen
    if not names and launcher:
        source, names = "the accelerate config's fsdp_transformer_layer_cls_to_wrap", launcher_classes()
    if names:
        missing = [n for n in names if not present[n]]
        if missing:
            blocks = ", ".join(own_blocks(model)) or candidates
            raise SettingsError(
                f"{source} names {', '.join(missing)}, which the {role} ({type(model).__name__}) does not have; "
                f"its blocks are {blocks}: remove that line (the recipe then wraps the model's own blocks) "
                f"or set fsdp_wrap to one of them"
            )
        return list(names)
    blocks = own_blocks(model)
    if not blocks:
        raise SettingsError(
            f"the {role} ({type(model).__name__}) declares no blocks (_no_split_modules) for FSDP to wrap: set "
            f"fsdp_wrap to its block class (repeated classes found: {candidates})"
        )
    return blocks


def describe_wrap(model: torch.nn.Module, names: list[str]) -> str:
    """`PhiDecoderLayer x 2` for the plan."""
    present = class_counts(model)
    return ", ".join(f"{n} x {present[n]}" for n in names)


def set_wrap(accelerator, names: list[str]) -> None:
    """Make the next `accelerator.prepare` of a model wrap `names`. Set before each model: accelerate keeps the
    first model's list (and policy) on the one shared plugin, which a teacher of another class (gpt_neox teaching
    a phi) does not have."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)  # undo the last model's partial()
    if policy is transformer_auto_wrap_policy:
        plugin.auto_wrap_policy = policy
        plugin.transformer_cls_names_to_wrap = list(names)


def merge_shared_embeddings(model: torch.nn.Module) -> int:
    """Make every embedding module that holds the input embedding's very weight that same module; how many.

    T5 keeps three `nn.Embedding`s (shared, encoder.embed_tokens, decoder.embed_tokens) around one tied Parameter.
    FSDP2 shards the input embedding as its own unit and refuses a Parameter seen by two units ("shared with a
    parameter already managed by another FSDP group"); one module in three places is one unit. The math, the
    state-dict keys and the saved checkpoint are unchanged."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is None:
        return 0
    merged = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not embed and isinstance(child, torch.nn.Embedding) and child.weight is weight:
                setattr(parent, name, embed)
                merged += 1
    return merged
