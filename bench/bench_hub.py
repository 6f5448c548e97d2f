#!/usr/bin/env python
"""What `inspect` and `convert --dry-run` fetch from the hub for a checkpoint of Llama-2-7B's size.

    python bench/bench_hub.py            # builds the repository once under --workdir, then measures
    python bench/bench_hub.py --json

The repository has Llama-2-7b-hf's layout: its config.json, two safetensors shards (9.98 GB and 3.50 GB, float16,
the tensors transformers saves for LlamaForCausalLM with that config) and the index. The shards are sparse files
(their headers are real, their data is a hole), so the build takes seconds and no disk space. They are served by
the local hub of the tests (tests/helpers/hub_server.py, files read from disk per request), with `HF_ENDPOINT`
pointing at it, and each command runs in a fresh process of the installed code, the way a user runs it. Measured,
side by side: the bytes the hub sent (and of those, bytes from inside tensor data), the requests, and the wall time
beside the same command on the local folder. Written to bench/results/hub-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tables import provenance  # noqa: E402  (bench/ is this script's folder, first on sys.path)

from tests.helpers.hub_server import FakeHub  # noqa: E402

# Llama-2-7b-hf's config.json as published (transformers 4.31).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
FIRST_SHARD = 10_000_000_000  # the hub's shards: model-00001 holds what fits under 10 GB


def tensor_shapes() -> dict[str, list[int]]:
    """Every tensor LlamaForCausalLM saves for this config, with its shape (a meta-device model: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B))
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def write_sparse_shard(path: Path, tensors: dict[str, list[int]]) -> None:
    """A float16 safetensors file whose header is real and whose data is a hole (sparse: no blocks on disk)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        size = 2
        for n in shape:
            size *= n
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def build(folder: Path) -> None:
    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, list[int]]] = [{}, {}]
    used = 0
    for name, shape in tensor_shapes().items():
        size = 2
        for n in shape:
            size *= n
        shards[0 if used + size <= FIRST_SHARD and not shards[1] else 1][name] = shape
        used += size
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        write_sparse_shard(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B, indent=2) + "\n")
    index = {"metadata": {"total_size": used}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _headers(folder: Path) -> list[int]:
    """Bytes outside tensor data in each file: whole non-weight files, and 8 + the header of each shard."""
    sizes = []
    for p in folder.iterdir():
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                sizes.append(8 + int.from_bytes(f.read(8), "little"))
        else:
            sizes.append(p.stat().st_size)
    return sizes


def run(command: list[str], env: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("GQA_BENCH_DIR", "/tmp/gqa-bench")))
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args()
    folder = args.workdir / "llama-2-7b-sparse"
    build(folder)
    repo_bytes = sum(p.stat().st_size for p in folder.iterdir())
    disk_bytes = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    cli = [sys.executable, "-m", "convert.cli"]
    results: dict = {}
    with FakeHub(lifetime=900) as hub, tempfile.TemporaryDirectory() as home:
        sha = hub.add_repo("org/Llama-2-7b-style", folder, on_disk=True)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": home, "HF_HUB_DISABLE_XET": "1"}
        env.update(PYTHONPATH=str(REPO), HF_HUB_DISABLE_TELEMETRY="1")
        for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
            env.pop(key, None)
        commands = {
            "inspect": ["inspect", "{src}", "--json"],
            "dry_run": ["convert", "{src}", str(Path(home) / "out"), "-g", "8", "--dry-run", "--json"],
        }
        for what, args_ in commands.items():
            hub.reset_counts()
            wall_hub, out = run([*cli, *(a.replace("{src}", "org/Llama-2-7b-style") for a in args_)], env)
            sent, weight, requests = sum(hub.sent.values()), hub.weight_bytes_sent, len(hub.requests)
            wall_local, _ = run([*cli, *(a.replace("{src}", str(folder)) for a in args_)], env)
            results[what] = {
                "bytes_sent": sent,
                "weight_bytes_sent": weight,
                "requests": requests,
                "wall_s_hub": round(wall_hub, 2),
                "wall_s_local_folder": round(wall_local, 2),
                "commit_recorded": (out.get("commit") or out.get("source_commit")) == sha,
            }
    names = {"inspect": "`inspect org/Llama-2-7b-style`", "dry_run": "`convert ... -g 8 --dry-run` (after it)"}
    result = {
        "provenance": provenance(),
        "load1": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "repository": {"files": sorted(p.name for p in folder.iterdir()), "bytes": repo_bytes, "on_disk": disk_bytes},
        "commands": results,
        "table": {  # rendered into docs/hub.md by bench/tables.py
            "columns": ["command", "the hub sent", "of it, tensor data", "requests", "wall (hub)", "wall (folder)"],
            "rows": [
                [names[w], f"{r['bytes_sent']:,} B", f"{r['weight_bytes_sent']:,} B", r["requests"],
                 f"{r['wall_s_hub']:.2f} s", f"{r['wall_s_local_folder']:.2f} s"]
                for w, r in results.items()
            ]
            + [["a full download", f"{repo_bytes:,} B", f"{repo_bytes - sum(_headers(folder)):,} B", "", "", ""]],
        },
    }  # fmt: skip
    out_file = REPO / "bench" / "results" / f"hub-{result['provenance']['commit']}.json"
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"Llama-2-7B-sized repository: {repo_bytes / 1e9:.2f} GB in 2 shards (sparse: {disk_bytes / 1e6:.1f} MB on "
        f"disk); commit {result['provenance']['commit']}, load {result['load1']:.1f} on {result['cpus']} CPUs"
    )
    print(f"{'command':<10}{'hub sent':>12}{'of weights':>12}{'requests':>10}{'wall hub':>10}{'wall local':>12}")
    for what, r in results.items():
        print(
            f"{what:<10}{r['bytes_sent']:>10,} B{r['weight_bytes_sent']:>10,} B{r['requests']:>10}"
            f"{r['wall_s_hub']:>9.2f}s{r['wall_s_local_folder']:>11.2f}s"
        )
    print(f"a full download would fetch {repo_bytes:,} B; results in {out_file.relative_to(REPO)}")
    return 0 if all(r["weight_bytes_sent"] == 0 and r["commit_recorded"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
