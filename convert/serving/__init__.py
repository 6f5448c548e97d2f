"""Serving converted checkpoints: the vLLM plugin (`gqa-convert[serve]`) and `gqa-convert eval --engine vllm`.

Nothing here imports vLLM at import time: `vllm_plugin.register` is the `vllm.general_plugins` entry point, and
vLLM imports the model classes of `vllm_alibi` only when it builds such a model.
"""
