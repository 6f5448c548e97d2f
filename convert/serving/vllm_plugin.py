"""The vLLM plugin of gqa-convert: serve the shipped-code outputs whose attention carries ALiBi.

vLLM's Transformers backend serves every shipped-code output (`gqa_gpt2`, `gqa_opt`, `gqa_bloom`, `gqa_mpt`): it
builds the shipped base model (`auto_map["AutoModel"]`) and runs each layer's attention call in vLLM's own
attention with the G-head paged KV cache. That backend gives vLLM's attention no ALiBi slopes, so bloom and mpt
would attend without their position bias (the shipped code refuses to run so). This plugin, registered through
vLLM's `vllm.general_plugins` entry point when gqa-convert is installed in vLLM's environment, maps their
architectures to `vllm_alibi.GQAAlibiForCausalLM`: the same backend, with the slopes given to vLLM's attention.
"""

from __future__ import annotations

# architecture written by the shipped template -> the vLLM model class serving it ("module:Class", imported lazily)
ARCHITECTURES = {
    "GQABloomForCausalLM": "convert.serving.vllm_alibi:GQAAlibiForCausalLM",
    "GQAMptForCausalLM": "convert.serving.vllm_alibi:GQAAlibiForCausalLM",
}


def register() -> None:
    """Register the ALiBi architectures with vLLM's model registry (vLLM calls this in each of its processes)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, where in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, where)
