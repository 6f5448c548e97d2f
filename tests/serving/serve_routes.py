"""Build, convert and serve every route in vLLM, next to transformers: the serving lane's one vLLM process.

Run by tests/serving/test_vllm_routes.py (python tests/serving/serve_routes.py WORKDIR [ROUTE ...]); it writes
WORKDIR/results.json with, per route: the prompt log-probs and greedy tokens of transformers (float32, eager,
with its cache) and of vLLM (float32, paged G-head cache), and vLLM's KV-cache token count at a fixed memory.
All routes share one process (vLLM's engine in-process: importing vLLM costs more than serving a tiny model).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

KV_GIB = 1  # VLLM_CPU_KVCACHE_SPACE: the fixed memory the cache gets
NEW_TOKENS = 8
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 120, 33, 64, 11], [300, 12, 12, 77, 210, 4, 9]]


def build_source(route, folder: Path) -> None:
    import torch
    from routes import POSITIONS, VOCAB
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(route.config, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if route.positions_key:
        kwargs[route.positions_key] = POSITIONS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(route.model_type, **kwargs))
    # Random init gives near-uniform logits (every greedy token alike); larger weights make the tokens vary.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder)


def convert(route, source: Path, output: Path) -> dict:
    cmd = [sys.executable, "-m", "convert.cli", "convert", str(source), str(output), "-g", str(route.num_kv_heads)]
    cmd += ["--json", "--overwrite"] + (["--write-modeling-code"] if route.shipped else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"gqa-convert failed for {route.name}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def transformers_reference(folder: Path) -> dict:
    """Prompt log-probs (of each next prompt token) and greedy tokens with transformers' own cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=True, attn_implementation="eager"
    ).eval()
    logprobs, tokens = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            logprobs.append([lp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)])
            out = model.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True
            )
            tokens.append(out[0, len(prompt) :].tolist())
    return dict(prompt_logprobs=logprobs, tokens=tokens)


def vllm_serve(folder: Path) -> dict:
    """The same through vLLM: its log-probs, its greedy tokens, its KV cache (blocks x block size)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder),
        dtype="float32",
        trust_remote_code=True,
        skip_tokenizer_init=True,
        enforce_eager=True,  # no compilation: its minutes buy nothing for a correctness check
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
        distributed_executor_backend="uni",
    )
    params = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0, ignore_eos=True, detokenize=False
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    logprobs = []
    for prompt, out in zip(PROMPTS, outs):
        # entry i holds the log-prob of prompt token i given the tokens before it (None for the first)
        logprobs.append([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])
    cache = llm.llm_engine.vllm_config.cache_config
    model_config = llm.llm_engine.vllm_config.model_config
    result = dict(
        prompt_logprobs=logprobs,
        tokens=[list(o.outputs[0].token_ids) for o in outs],
        kv_blocks=cache.num_gpu_blocks,
        block_size=cache.block_size,
        architecture=model_config.architecture,
        num_kv_heads=model_config.get_total_num_kv_heads(),
        head_size=model_config.get_head_size(),
        num_layers=model_config.get_num_layers(llm.llm_engine.vllm_config.parallel_config),
    )
    del llm
    gc.collect()
    return result


def main() -> None:
    work = Path(sys.argv[1])
    from routes import BY_NAME, ROUTES

    names = sys.argv[2:] or [r.name for r in ROUTES]
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(KV_GIB)  # before vLLM is imported
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its cache config readable
    results: dict[str, dict] = {}
    path = work / "results.json"

    def attempt(name: str, step) -> None:  # one route's failure is that route's tests failing, not the lane's
        if "error" in results[name]:
            return
        try:
            step(name)
        except Exception as e:
            results[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        path.write_text(json.dumps(results, indent=1))

    def prepare(name: str) -> None:
        route = BY_NAME[name]
        source, output = work / f"{name}-src", work / f"{name}-out"
        build_source(route, source)
        report = convert(route, source, output)
        config = json.loads((output / "config.json").read_text())
        results[name].update(
            output_model_type=config["model_type"], route=report.get("route"), reference=transformers_reference(output)
        )

    def serve(name: str) -> None:
        results[name].update(vllm=vllm_serve(work / f"{name}-out"), kv_bytes=KV_GIB << 30)

    # Every transformers reference first: vLLM's backend decorates the transformers classes it serves (for its
    # compiler), after which they no longer build outside vLLM in this process.
    for name in names:
        results[name] = {}
        attempt(name, prepare)
    for name in names:
        attempt(name, serve)


if __name__ == "__main__":
    main()
