"""The settings that make large runs fast: attention kernel, optimizer, torch.compile, each checked before compute.

Whatever is missing is refused by name with what to install or set instead, never found mid-run: flash attention
without `flash_attn` or a GPU, flex attention on a torch without it, an 8-bit optimizer without bitsandbytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from convert.errors import SettingsError
from convert.uptrain.settings import Settings

INSTALL = {
    "flash_attention_2": "it needs a CUDA GPU and pip install flash-attn --no-build-isolation",
    "flex_attention": "it needs a CUDA GPU and torch 2.5 or later (torch has no CPU kernel for its backward)",
}


def attention_available(name: str) -> bool:
    """Whether the kernel `name` can run here at all (installed, and a GPU for flash attention)."""
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    if name == "flash_attention_2":
        return is_flash_attn_2_available() and torch.cuda.is_available()
    if name == "flex_attention":  # its backward has no CPU kernel: training needs a GPU
        return is_torch_flex_attn_available() and torch.cuda.is_available()
    return True


def choose_attention(s: Settings, build: Callable[[str], object], role: str = "model") -> str:
    """The attention implementation for the model `build(impl)` makes (on the meta device).

    The default, sdpa, falls back to eager for a class without an sdpa path (stock mpt); a value the user set is
    kept or refused, naming what to do."""
    wanted, explicit = s.attn_implementation, "attn_implementation" in s.model_fields_set
    if not attention_available(wanted):
        raise SettingsError(
            f"attn_implementation={wanted} is not available here: {INSTALL[wanted]}; or set attn_implementation: sdpa"
        )
    try:
        build(wanted)
    except (ValueError, ImportError) as e:
        if wanted == "sdpa" and not explicit:
            build("eager")
            return "eager"
        raise SettingsError(
            f"the {role} cannot use attn_implementation={wanted}: {str(e).splitlines()[0]}; set attn_implementation: "
            f"sdpa or eager"
        ) from None
    return wanted


def check_optimizer(s: Settings) -> None:
    """The optimizer can be built here (bitsandbytes installed for adamw_8bit)."""
    if s.optimizer == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SettingsError(
                "optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes (on a CUDA GPU), "
                "or set optimizer: adamw"
            ) from None


def fused_supported(device: torch.device) -> bool:
    """torch's fused AdamW kernel runs on CUDA (and XPU, MPS); on CPU the default foreach path is used."""
    return device.type in ("cuda", "xpu", "mps")


def make_optimizer(s: Settings, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused where the device supports it), or bitsandbytes' 8-bit AdamW."""
    common = dict(lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps)
    if s.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **common)
    return torch.optim.AdamW(groups, **common, fused=True if fused_supported(device) else None)


def optimizer_name(s: Settings, device: torch.device) -> str:
    if s.optimizer == "adamw_8bit":
        return "AdamW 8-bit (bitsandbytes)"
    return "AdamW, fused" if fused_supported(device) else "AdamW"
