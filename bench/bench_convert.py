#!/usr/bin/env python
"""Benchmark `gqa-convert convert` against copying the checkpoint folder and against the naive transformers path.

    python bench/bench_convert.py                 # ~1.04B-parameter llama, 2 GB shards, 3 rounds
    python bench/bench_convert.py --small         # ~106M parameters, 100 MB shards: a quick sanity run
    python bench/bench_convert.py --source plain  # the config as transformers 5 saves it, in a plain folder
    python bench/bench_convert.py --json --quiet  # results as JSON only

A synthetic MHA llama checkpoint (bf16, random weights) is built once in a subprocess and cached under --workdir
(default $GQA_BENCH_DIR, else /tmp/gqa-bench). By default (--source hub) it has the shape of a checkpoint as it is
published and downloaded: config.json written the way Llama-2-7b's is on the hub (no head_dim, no rope_parameters;
`torch_dtype`, `rope_scaling: null`, `pretraining_tp`), and the files in a hub cache, `models--org--name/snapshots/
<commit>/` holding links into `blobs/`, as huggingface_hub lays them out. These methods are then measured, each run
in a fresh subprocess:

    copy        `cp -rL SRC OUT`: the floor for anything that reads and writes every byte (the time goal's baseline;
                -L follows the hub cache's links, as copying a snapshot must)
    convert     `gqa-convert convert SRC OUT --num-kv-heads G --quiet --max-shard-size S` (the installed script)
    copysync    `cp -rL SRC OUT && sync OUT/*`: the copy made durable (its data on disk when it ends)
    convertsync convert with --fsync: its output on disk before it appears (compared with copysync)
    naive       from_pretrained(dtype=bfloat16), mean-pool k_proj/v_proj per group in float32, rebuild the Linear
                modules, set config.num_key_value_heads, save_pretrained(max_shard_size=S)

Wall time is measured around the subprocess (start to reap). Peak RSS is the kernel's high-water mark (ru_maxrss)
of that one command, as GNU time reports it (`/usr/bin/time -f %M`, from wait4() on the command it forked). Not
os.wait4() on our own child: a child forked from this process inherits this process's RSS as its high-water mark,
which survives exec (see measure()); not getrusage(RUSAGE_CHILDREN) either, which takes the max over every child
ever reaped. A psutil poll of the command's process tree every 10 ms is recorded beside it as a cross-check.

Page cache: the source (about 2.1 GB) fits easily in RAM. Before measuring, one untimed `cp -r` reads the whole source
into the page cache and one untimed `python -c "import torch, transformers, convert..."` warms the library files, so
every measured run starts from a warm source. After every run its output is checked (cheap header reads), deleted, and
os.sync() is called outside the timed region, so no run pays for the previous run's writeback. Then the benchmark
waits --settle seconds (default 5): this VM reports freed memory to its host about 2 s after it is freed, and a run
that starts before that mostly finds its page cache memory still backed (cp -r: 0.6 s in 3 of 4 tries) while one
that starts after pays the host to back it again (cp -r: 2.5-2.8 s in 4 of 4; one machine, same files). Waiting
puts every run in the second state instead of leaving it to a race. Rounds interleave the methods in a seeded
shuffle per round, so slow spells on the shared CPU, and the after-effects of the previous run (freed memory,
written-back pages), spread over all of them; the table reports
the median over --repeats rounds.

The table also gives the median CPU seconds (user + sys) of each command: on a shared machine wall time depends on
the other users' load, CPU time much less.

Goals, each with the bar it must at least clear, side by side in one run: convert wall time at most 1.0x that of
copy (bar 1.3x); convert peak RSS at most 150 MB (bar 200 MB); naive at least 4x the peak memory of convert; and
convertsync within 1.3x of copysync (both durable). Exit status: 0 when every bar whose methods ran is cleared
and the outputs check out, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tables import provenance  # bench/ is this script's folder, first on sys.path

METHODS = {
    "copy": "cp -r: the time goal's baseline",
    "convert": "gqa-convert convert",
    "copysync": "cp -r, then sync of the copied files: the copy made durable",
    "convertsync": "gqa-convert convert --fsync: the output made durable before it appears",
    "naive": "from_pretrained, edit, save_pretrained",
    "dryrun": "convert --dry-run: its startup cost alone",
}
TIME_GOAL, TIME_BAR = 1.0, 1.3  # convert wall time / copy wall time: the goal, and the bar it must clear
RSS_GOAL_MB, RSS_BAR_MB = 150, 200  # convert peak RSS in MB (10^6 bytes)
MEMORY_GOAL = 4.0  # naive peak RSS / convert peak RSS must be at least this

# Model shapes. "full": 18 layers of hidden 2048 with untied embeddings is 1.042B parameters (2.08 GB in bf16).
PRESETS = {
    "full": dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=18,
        num_attention_heads=16,
        vocab_size=32000,
        shard="2GB",
    ),
    "small": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        vocab_size=32000,
        shard="100MB",
    ),
}

_quiet = False


def log(msg: str) -> None:
    if not _quiet:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Workers: run as `python bench_convert.py --worker NAME ...` in their own process.


def worker_build(folder: str, spec_json: str) -> None:
    """Random-weight MHA llama in bf16, saved with save_pretrained in shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(spec_json)
    config = LlamaConfig(
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"],  # MHA
        vocab_size=spec["vocab_size"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # Built directly in bf16: a float32 model would need twice the memory (8 GB at 1B parameters).
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=spec["shard"])


def hub_config(spec: dict) -> dict:
    """config.json as Llama-2-7b's is on the hub (written by transformers 4.31), at the benchmark's sizes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": spec["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": spec["intermediate_size"],
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": spec["num_attention_heads"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_key_value_heads": spec["num_attention_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0.dev0",
        "use_cache": True,
        "vocab_size": spec["vocab_size"],
    }


def to_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Move a checkpoint folder's files into a hub cache laid out as huggingface_hub does (blobs named by their
    sha256, a snapshot of relative links to them, refs/main); returns the snapshot folder."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                digest.update(chunk)
        os.replace(f, repo / "blobs" / digest.hexdigest())
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest.hexdigest())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def worker_naive(source: str, output: str, groups: str, shard: str) -> None:
    """The path a user takes without gqa-convert: load the whole model, pool, resize the modules, save."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    g = int(groups)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        config = model.config
        hkv = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("k_proj", "v_proj"):
                old = getattr(attn, name)
                w = old.weight.float().reshape(g, hkv // g, head_dim, old.in_features).mean(1)
                new = nn.Linear(old.in_features, g * head_dim, bias=old.bias is not None, device="meta")
                new.weight = nn.Parameter(
                    w.reshape(g * head_dim, old.in_features).to(old.weight.dtype), requires_grad=False
                )
                if old.bias is not None:
                    b = old.bias.float().reshape(g, hkv // g, head_dim).mean(1).reshape(-1)
                    new.bias = nn.Parameter(b.to(old.bias.dtype), requires_grad=False)
                setattr(attn, name, new)
            attn.num_key_value_groups = config.num_attention_heads // g
        config.num_key_value_heads = g
        model.save_pretrained(output, max_shard_size=shard)


# ---------------------------------------------------------------------------------------------------------------
# Measuring one subprocess


def measure(cmd: list[str], log_path: Path, poll_s: float = 0.01) -> dict:
    """Run cmd to completion: wall seconds, its exact peak RSS, and a polled peak as a cross-check.

    The peak comes from GNU time (`/usr/bin/time -f %M`), which reads ru_maxrss from wait4() on the command it
    forked itself. Reading wait4() here instead would be wrong: a child forked from this process starts with this
    process's pages mapped, and the kernel carries that high-water mark across exec, so every child would report at
    least this (large, torch-importing) process's RSS. GNU time is a ~2 MB process, so that floor is negligible.
    """
    import psutil

    rss_file = log_path.with_suffix(".maxrss")
    gnu_time = Path("/usr/bin/time")
    wrapped = [str(gnu_time), "-f", "%M", "-o", str(rss_file), *cmd] if gnu_time.exists() else cmd
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()
        polled = [0]

        def poll() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            kids: list = []
            tick = 0
            while not stop.is_set():
                try:
                    if tick < 50 or tick % 20 == 0:  # children() scans /proc: every tick at first, then every 200 ms
                        kids = root.children(recursive=True)
                    rss = root.memory_info().rss
                    for k in kids:
                        with contextlib.suppress(psutil.Error):
                            rss += k.memory_info().rss
                    polled[0] = max(polled[0], rss)
                except psutil.Error:  # exited (zombie until reaped) or gone
                    pass
                tick += 1
                stop.wait(poll_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        poller.join()
    if gnu_time.exists():
        peak_kib = int(rss_file.read_text().split()[-1])
        rss_file.unlink()
    else:  # no GNU time: wait4's figure, which has this process's RSS at fork time as its floor
        peak_kib = usage.ru_maxrss
    return {
        "wall_s": wall,
        "peak_rss_mib": peak_kib / 1024,  # Linux reports KiB
        "polled_rss_mib": polled[0] / 2**20,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "returncode": proc.returncode,
    }


# ---------------------------------------------------------------------------------------------------------------
# Output checks: headers and config only, plus one merged tensor compared numerically


def st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def tensor_table(folder: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (dtype, shape, file) over every shard of a safetensors checkpoint folder."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    table = {}
    for name in files:
        for key, h in st_header(folder / name).items():
            table[key] = (h["dtype"], tuple(h["shape"]), folder / name)
    return table


def check_output(out: Path, src: Path, groups: int) -> list[str]:
    """Problems with a converted folder: KV heads in config.json, every tensor's name/dtype/shape, layer 0's k_proj."""
    problems = []
    try:
        cfg = json.loads((out / "config.json").read_text())
        src_cfg = json.loads((src / "config.json").read_text())
        if cfg.get("num_key_value_heads") != groups:
            problems.append(f"config.json num_key_value_heads = {cfg.get('num_key_value_heads')}, want {groups}")
        heads, hidden = src_cfg["num_attention_heads"], src_cfg["hidden_size"]
        head_dim = src_cfg.get("head_dim") or hidden // heads
        hkv = src_cfg["num_key_value_heads"]
        before, after = tensor_table(src), tensor_table(out)
        if set(before) != set(after):
            problems.append(
                f"tensor names differ: missing {sorted(set(before) - set(after))[:5]}, "
                f"extra {sorted(set(after) - set(before))[:5]}"
            )
        for key in sorted(set(before) & set(after)):
            dtype, shape, _ = before[key]
            if key.endswith(("k_proj.weight", "v_proj.weight")):
                shape = (groups * head_dim, hidden)
            if after[key][:2] != (dtype, shape):
                problems.append(f"{key}: {after[key][:2]}, want {(dtype, shape)}")
        if len(problems) > 8:
            problems[8:] = [f"... {len(problems) - 8} more"]
        key = "model.layers.0.self_attn.k_proj.weight"
        if key in before and key in after and not problems:
            from safetensors import safe_open

            with safe_open(before[key][2], "pt") as f:
                k = f.get_tensor(key)
            with safe_open(after[key][2], "pt") as f:
                merged = f.get_tensor(key)
            want = k.float().reshape(groups, hkv // groups, head_dim, hidden).mean(1).reshape(-1, hidden)
            diff = (merged.float() - want).abs().max().item()
            if diff > 1e-2 * want.abs().max().item():  # bf16 rounding only
                problems.append(f"{key} is not the group mean of the source heads (max diff {diff:.3g})")
    except (OSError, KeyError, ValueError) as e:
        problems.append(f"could not read the output: {type(e).__name__}: {e}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


def convert_script() -> str:
    """The installed console script beside this interpreter (pyenv shims add a bash and a pyenv process)."""
    beside = Path(sys.executable).parent / "gqa-convert"
    if beside.exists():
        return str(beside)
    found = shutil.which("gqa-convert")
    if not found:
        sys.exit("gqa-convert is not installed: pip install -e . in the project root")
    return found


def du(folder: Path) -> int:
    """Bytes of the files in a folder, following links (a hub snapshot holds links to its blobs)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_source(workdir: Path, preset: str, rebuild: bool, kind: str = "hub") -> tuple[Path, dict]:
    """The source checkpoint, built once and cached: `hub` (the published shape, in a hub cache; returns the
    snapshot folder) or `plain` (the config transformers 5 saves, in a plain folder)."""
    spec = PRESETS[preset]
    root = workdir / f"llama-mha-{preset}-{kind}"
    stamp = root / "bench_spec.json"
    src = root / "hub" / "models--bench--llama-mha" / "snapshots" / ("0" * 40) if kind == "hub" else root / "model"
    if src.exists() and not rebuild and stamp.exists() and json.loads(stamp.read_text()) == spec:
        log(f"using cached source {src}")
        return src, spec
    shutil.rmtree(root, ignore_errors=True)
    tmp = workdir / f".llama-mha-{preset}-{kind}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"building the {preset} source model ({kind}) in {root} (once; a subprocess)")
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--worker", "build", str(tmp / "model"), json.dumps(spec)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"building the source model failed:\n{run.stdout}\n{run.stderr}")
    if kind == "hub":
        (tmp / "model" / "config.json").write_text(json.dumps(hub_config(spec), indent=2, sort_keys=True) + "\n")
        to_hub_cache(tmp / "model", tmp / "hub", "bench/llama-mha")
        (tmp / "model").rmdir()
    (tmp / "bench_spec.json").write_text(json.dumps(spec))
    os.replace(tmp, root)
    log(f"built in {time.perf_counter() - t0:.0f} s ({du(src) / 1e9:.2f} GB)")
    return src, spec


def source_params(src: Path) -> int:
    total = 0
    for _, shape, _ in tensor_table(src).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def git_state() -> dict:
    """The commit measured, and whether convert/ had uncommitted changes (others may be editing the tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "convert"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "convert_dirty": bool(dirty)}


def main() -> int:
    global _quiet
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("GQA_BENCH_DIR") or Path(tempfile.gettempdir()) / "gqa-bench"),
        help="cache for the source model and scratch space for outputs (default $GQA_BENCH_DIR, else /tmp/gqa-bench)",
    )
    p.add_argument("--small", action="store_true", help="~106M parameters and 100 MB shards, for a quick check")
    p.add_argument("--rebuild", action="store_true", help="build the source model again even if cached")
    p.add_argument(
        "--source",
        choices=("hub", "plain"),
        default="hub",
        help="hub (default): Llama-2-style config.json in a hub cache of linked blobs; plain: the config "
        "transformers 5 saves, in a plain folder",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds of (copy, convert, naive); the median is reported")
    p.add_argument("--num-kv-heads", type=int, default=4, help="G for convert and naive")
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds to wait before each timed run, so that memory freed by the previous run has been "
        "handed back to the host (see the docstring); 0 to not wait",
    )
    p.add_argument(
        "--methods",
        default="copy,convert,copysync,convertsync,naive",
        help="comma-separated, in run order: "
        + ", ".join(f"{k} ({v})" for k, v in METHODS.items())
        + ". The goals need copy, convert and naive",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        {"build": worker_build, "naive": worker_naive}[args.worker[0]](*args.worker[1:])
        return 0
    _quiet = args.quiet
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS) or not methods:
        p.error(f"--methods: choose from {', '.join(METHODS)} (got {args.methods})")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    preset = "small" if args.small else "full"
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    src, spec = build_source(workdir, preset, args.rebuild, args.source)
    shard, g = spec["shard"], args.num_kv_heads
    out = workdir / "out"
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    script = convert_script()
    convert = [script, "convert", str(src), str(out), "--num-kv-heads", str(g), "--quiet"]
    commands = {
        "copy": ["cp", "-rL", str(src), str(out)],
        "convert": [*convert, "--max-shard-size", shard],
        # Both made durable: every file fsynced before the command ends.
        "copysync": ["sh", "-c", f'cp -rL "{src}" "{out}" && sync "{out}"/*'],
        "convertsync": [*convert, "--max-shard-size", shard, "--fsync"],
        "naive": [sys.executable, __file__, "--worker", "naive", str(src), str(out), str(g), shard],
        # Startup floor of convert: imports, headers, plan; writes nothing. Off by default (--methods to add it).
        "dryrun": [*convert, "--dry-run"],
    }

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        for stale in workdir.glob(".out.gqa-*"):  # convert's temporary folder, if a run died
            shutil.rmtree(stale, ignore_errors=True)
        os.sync()

    clean()
    log("warm-up (untimed): cp -rL of the source into the page cache, and the python imports")
    subprocess.run(commands["copy"], check=True)
    clean()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, transformers, convert.pipeline.conversion; "
            "from transformers import AutoModelForCausalLM, LlamaForCausalLM",
        ],
        check=True,
    )

    samples: dict[str, list[dict]] = {m: [] for m in methods}
    checks: dict[str, list[str]] = {}
    for r in range(args.repeats):
        # A run's speed depends on what the previous run left behind (the naive path frees 2.5 GB, which this VM
        # hands back to its host, and the next run pays to get memory again), so each round takes its own seeded
        # shuffle of the order: no method always follows the same one. (A rotation would not do: it keeps each
        # method's predecessor.)
        order = list(methods)
        random.Random(r).shuffle(order)
        for m in order:
            log(f"round {r + 1}/{args.repeats}: {m}")
            time.sleep(args.settle)
            load = os.getloadavg()[0]  # other users of the shared CPU: recorded beside every sample
            res = measure(commands[m], logs / f"{m}-{r + 1}.log")
            res["load1_before"] = load
            if res["returncode"]:
                tail = (logs / f"{m}-{r + 1}.log").read_text(errors="replace")[-2000:]
                sys.exit(f"{m} failed (exit {res['returncode']}):\n{tail}")
            res["cpu_s"] = res["user_s"] + res["sys_s"]
            res["out_bytes"] = du(out) if out.exists() else 0
            if m in ("convert", "convertsync", "naive") and m not in checks:  # first round: outputs do not change
                checks[m] = check_output(out, src, g)
            log(
                f"  {res['wall_s']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB "
                f"(polled {res['polled_rss_mib']:.0f} MiB), user {res['user_s']:.1f} s, sys {res['sys_s']:.1f} s, "
                f"load before {load:.1f}"
            )
            samples[m].append(res)
            clean()

    med = {
        m: {
            k: statistics.median(s[k] for s in v)
            for k in ("wall_s", "peak_rss_mib", "polled_rss_mib", "user_s", "sys_s", "cpu_s", "out_bytes")
        }
        for m, v in samples.items()
    }
    goals = {}
    for name, conv, base, goal in (
        ("time", "convert", "copy", TIME_GOAL),
        ("durable time", "convertsync", "copysync", None),
    ):
        if conv in med and base in med:
            ratio = med[conv]["wall_s"] / med[base]["wall_s"]
            goals[name] = {
                "what": f"{conv} wall time / {base}"
                + (f": goal {goal}x, bar {TIME_BAR}x" if goal else f" <= {TIME_BAR}x"),
                "value": ratio,
                "unit": "x",
                "goal_met": ratio <= (goal or TIME_BAR),
                "pass": ratio <= TIME_BAR,
            }
    if "convert" in med:
        mb = med["convert"]["peak_rss_mib"] * 2**20 / 1e6
        goals["peak RSS"] = {
            "what": f"convert peak RSS: goal {RSS_GOAL_MB} MB, bar {RSS_BAR_MB} MB",
            "value": mb,
            "unit": " MB",
            "goal_met": mb <= RSS_GOAL_MB,
            "pass": mb <= RSS_BAR_MB,
        }
    if "convert" in med and "naive" in med:
        ratio = med["naive"]["peak_rss_mib"] / med["convert"]["peak_rss_mib"]
        goals["memory"] = {
            "what": f"naive peak RSS / convert's >= {MEMORY_GOAL}x",
            "value": ratio,
            "unit": "x",
            "goal_met": ratio >= MEMORY_GOAL,
            "pass": ratio >= MEMORY_GOAL,
        }
    load = os.getloadavg()
    loads = [x["load1_before"] for v in samples.values() for x in v]
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "loadavg_at_end": [round(x, 2) for x in load],
            "load1_before_runs": [round(min(loads), 2), round(max(loads), 2)],
        },
        "model": {
            "preset": preset,
            "source": args.source,
            **spec,
            "parameters": source_params(src),
            "bytes": du(src),
            "folder": str(src),
        },
        "git": git_state(),
        "num_kv_heads": g,
        "repeats": args.repeats,
        "settle_s": args.settle,
        "commands": {m: " ".join(commands[m]) for m in methods},
        "provenance": provenance(),
        "median": med,
        "samples": samples,
        "goals": goals,
        "checks": checks,
    }
    try:
        import torch
        import transformers

        result["host"].update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    ok = all(gl["pass"] for gl in goals.values()) and not any(checks.values())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0 if ok else 1


def print_table(r: dict) -> None:
    med, m = r["median"], r["model"]
    print(
        f"{m['parameters'] / 1e9:.3f}B-parameter llama MHA, bf16, {m['bytes'] / 1e9:.2f} GB in {m['shard']} shards "
        f"({'Llama-2-style config in a hub cache' if m.get('source', 'hub') == 'hub' else 'transformers 5 config'}) "
        f"-> {r['num_kv_heads']} KV heads; median of {r['repeats']} round(s), {r.get('settle_s', 0):g} s settle; "
        f"{r['host']['cpus']} CPUs "
        f"(1-min load {r['host']['load1_before_runs'][0]:.1f}-{r['host']['load1_before_runs'][1]:.1f}); {r['date']}"
        + (
            f"; commit {r['git']['commit']}{' + uncommitted convert/' if r['git']['convert_dirty'] else ''}"
            if r.get("git")
            else ""
        )
    )
    copy = med.get("copy", {}).get("wall_s")
    conv = med.get("convert", {}).get("peak_rss_mib")
    print(
        f"{'method':<11} {'wall s':>8} {'cpu s':>7} {'peak RSS MiB':>13} {'polled MiB':>11} {'time/copy':>10} "
        f"{'mem/convert':>12}"
    )
    for name, v in med.items():
        t = f"{v['wall_s'] / copy:.2f}x" if copy else "-"
        mem = f"{v['peak_rss_mib'] / conv:.1f}x" if conv and not name.startswith("copy") else "-"
        print(
            f"{name:<11} {v['wall_s']:>8.2f} {v['cpu_s']:>7.2f} {v['peak_rss_mib']:>13.0f} "
            f"{v['polled_rss_mib']:>11.0f} {t:>10} {mem:>12}"
        )
    if r["repeats"] > 1:
        print(
            "all rounds, wall s: "
            + "; ".join(f"{name} " + " ".join(f"{s['wall_s']:.2f}" for s in v) for name, v in r["samples"].items())
        )
    if m["preset"] != "full":
        print(
            "note: the goals are set for the ~1B model; at ~100M the fixed cost of starting Python (and, for "
            "naive, torch and transformers) dominates"
        )
    for gl in r["goals"].values():
        verdict = "FAIL" if not gl["pass"] else "PASS" if gl.get("goal_met", True) else "BAR "  # BAR: bar only
        print(f"{verdict}  {gl['what']}: {gl['value']:.2f}{gl.get('unit', 'x')}")
    for name, problems in r["checks"].items():
        print(
            f"{'FAIL' if problems else 'PASS'}  {name} output: config num_key_value_heads, tensor names/dtypes/"
            f"shapes, layer-0 k_proj = group mean" + ("" if not problems else ": " + "; ".join(problems))
        )


if __name__ == "__main__":
    sys.exit(main())
