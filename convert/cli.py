"""`gqa-convert`: a thin click layer; every command parses its options and calls the library."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import click

from convert.errors import ConversionError, MissingExtra
from convert.formatting import human_bytes
from convert.methods import method_names  # the registry alone: no method, no torch is imported before copying starts
from convert.methods.flags import CalibrationFlags
from convert.pipeline.conversion import convert_checkpoint
from convert.pipeline.settings import Settings
from convert.pipeline.source import describe
from convert.version import __version__


def _fail(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


def field_names(model: type) -> set[str]:
    return {f.name for f in fields(model)}


def options_from(model: type) -> Callable:
    """Click options for every field of a settings dataclass declared with `flags.flag` (one source of truth:
    the name, default, help and choices live on the field)."""
    hints = get_type_hints(model)

    def decorate(command: Callable) -> Callable:
        for f in reversed([f for f in fields(model) if "help" in f.metadata]):
            m = f.metadata
            names = [f"--{(m['name'] or f.name).replace('_', '-')}", *([m["short"]] if m["short"] else []), f.name]
            kind = hints[f.name]
            choices = m["choices"]() if callable(m["choices"]) else m["choices"]
            if kind is bool:
                command = click.option(*names, is_flag=True, help=m["help"])(command)
                continue
            if choices:
                kind = click.Choice(list(choices))
            elif kind in (int, int | None):
                kind = int
            else:
                kind = str
            show = f.default is not None
            option = click.option(
                *names, type=kind, default=f.default, show_default=show, help=m["help"], metavar=m.get("metavar")
            )
            command = option(command)
        return command

    return decorate


@click.group()
@click.version_option(__version__, prog_name="gqa-convert")
def main() -> None:
    """Convert multi-head attention checkpoints to grouped-query (GQA) or multi-query (MQA) attention."""


@main.command()
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--num-kv-heads", "-g", type=int, required=True, help="KV heads after conversion (G; 1 = MQA).")
@click.option(
    "--method",
    type=click.Choice(method_names()),
    default="mean",
    show_default=True,
    help="How the KV heads of a group are merged.",
)
@options_from(Settings)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, only the result line.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@options_from(CalibrationFlags)
@click.option(
    "--option",
    "method_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Calibrated methods: any other method option (repeatable; docs/calibrated.md lists them), e.g. "
    "--option reconstruct_epochs=2. VALUE is read as JSON (numbers, true/false), else as a string.",
)
def convert(
    source: str,
    output: str,
    num_kv_heads: int,
    method: str,
    quiet: bool,
    as_json: bool,
    method_option: tuple[str, ...] = (),
    **flags,
) -> None:
    """Convert SOURCE (folder or hub id) into OUTPUT with NUM_KV_HEADS key/value heads."""
    _keep_freed_memory()
    settings = {k: v for k, v in flags.items() if k in field_names(Settings)}
    calibration = {k: v for k, v in flags.items() if k in field_names(CalibrationFlags) and v is not None}
    for pair in method_option:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            _fail(ConversionError(f"--option {pair!r}: write KEY=VALUE, e.g. --option reconstruct_epochs=2"))
        try:
            calibration[key] = json.loads(value)
        except json.JSONDecodeError:
            calibration[key] = value
    try:
        report = convert_checkpoint(
            source,
            output,
            num_kv_heads,
            method,
            **settings,
            progress=not (quiet or as_json),
            method_options=calibration or None,
        )
    except ConversionError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    _print_report(report, quiet)


def _rest(r: Any) -> str:
    """What happens to the tensors attention does not touch: copied, or also re-expressed on a stock route."""
    return "copied unchanged" if r.route in ("as is", "shipped code") else "re-expressed as the route says or copied"


def _print_report(r: Any, quiet: bool) -> None:
    what = "would write" if r.dry_run else "wrote"
    line = (
        f"{r.source} ({r.model_type}): {r.kv_heads_before} -> {r.kv_heads_after} KV heads by {r.method}; "
        f"{what} {r.output}"
    )
    if r.push_to_hub:
        line += f"; {'would upload' if r.dry_run else 'uploaded'} to {r.pushed or r.push_to_hub}"
    if quiet and not r.dry_run:
        click.echo(line)
        return
    click.echo(line)
    if r.source_commit:
        click.echo(f"  source commit: {r.source_commit}")
    click.echo(
        f"  tensors: {r.tensors_total} total, {len(r.tensors_touched)} rewritten "
        f"(attention of every layer), the rest {_rest(r)}"
    )
    click.echo(
        f"  bytes in: {human_bytes(r.bytes_in)}, bytes out: {human_bytes(r.bytes_out)} in {r.shards_out} shard(s)"
    )
    click.echo(
        f"  KV cache per token: {human_bytes(r.kv_cache_bytes_per_token_before)} -> "
        f"{human_bytes(r.kv_cache_bytes_per_token_after)} "
        f"({r.kv_cache_bytes_per_token_before / r.kv_cache_bytes_per_token_after:.1f}x smaller)"
    )
    if r.dry_run:
        for name in r.tensors_touched[:8]:
            click.echo(f"    rewrite {name}")
        if len(r.tensors_touched) > 8:
            click.echo(f"    ... and {len(r.tensors_touched) - 8} more")
    if r.route != "as is":
        click.echo(f"  route: {r.route} (output model_type {r.output_model_type}); load with {r.load_with}")
    for note in r.notes:
        click.echo(f"  note: {note}")


@main.command()
@click.argument("source")
@click.option("--revision", default=None, help="Hub revision when SOURCE is a hub id.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle (*.bin) weights.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(source: str, revision: str | None, allow_pickle: bool, as_json: bool) -> None:
    """Family, heads, KV heads, head_dim, valid --num-kv-heads values and their KV-cache bytes per token."""

    try:
        info = describe(source, revision, allow_pickle)
    except ConversionError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(
        f"{info['source']}: {info['model_type']}, {info['layers']} layers, hidden {info['hidden_size']}, "
        f"{info['parameters'] / 1e6:.1f}M parameters ({info['dtype']})"
    )
    if info.get("commit"):
        click.echo(f"  commit {info['commit']}")
    click.echo(
        f"  heads {info['num_heads']}, KV heads {info['num_kv_heads']}, head_dim {info['head_dim']}, "
        f"rotary dims {info['rotary_dim']}"
    )
    if info["route"] != "as is":
        click.echo(f"  route: {info['route']}: written as {info['output_model_type']}; load with {info['load_with']}")
    click.echo("  --num-kv-heads   KV cache per token")
    shipped = info.get("shipped_code", {})
    for g, n in info["valid_num_kv_heads"].items():
        mark = "  (current)" if g == info["num_kv_heads"] else ""
        mark += "  (shipped code: --write-modeling-code)" if g in shipped else ""
        click.echo(f"  {g:>14}   {n:>10,} B{mark}")
    for note in dict.fromkeys(shipped.values()):
        click.echo(f"  {note}")
    for note in info.get("notes", []):
        click.echo(f"  note: {note}")


@main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data",
    default=None,
    help="Text to score: a .txt/.jsonl/.json/.parquet file or a hub dataset (default: Python's pydoc text).",
)
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per perplexity window.")
@click.option("--stride", type=int, default=None, help="Tokens between window starts (default: the window).")
@click.option("--max-windows", type=int, default=8, show_default=True, help="Windows scored per model (0: all).")
@click.option(
    "--contexts",
    default=None,
    help="Context lengths for the decode measurement (comma-separated; empty to skip). Default 128,512,2048, "
    "leaving out with a warning those a model's positions or the text are too short for; given ones are all "
    "measured or refused.",
)
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Tokens decoded per measurement.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@click.option(
    "--tokenizer", default=None, help="Tokenizer folder or hub id, for model folders without one (e.g. the original)."
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let transformers run modeling code shipped with a model (outputs written with --write-modeling-code).",
)
@click.option(
    "--engine",
    type=click.Choice(["transformers", "vllm"]),
    default="transformers",
    show_default=True,
    help="Run the models in transformers, or serve them in vLLM (installed here: docs/serving.md).",
)
@click.option(
    "--kv-memory",
    default="1GiB",
    show_default=True,
    help="--engine vllm: the KV cache memory, whose token count is reported (e.g. 512MiB, 2GiB).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_(
    models: tuple[str, ...],
    data: str | None,
    window: int,
    stride: int | None,
    max_windows: int,
    contexts: str,
    new_tokens: int,
    device: str,
    tokenizer: str | None,
    trust_remote_code: bool,
    engine: str,
    kv_memory: str,
    as_json: bool,
) -> None:
    """Perplexity, KV-cache bytes per token and decode speed of MODELS, as one table with ratios to the first."""
    from transformers.utils import logging as hf_logging

    from convert.eval.compare import as_dicts, compare, format_table

    hf_logging.disable_progress_bar()
    ctx = None
    if contexts is not None:
        try:
            ctx = tuple(int(c) for c in contexts.split(",") if c.strip())
        except ValueError:
            _fail(ValueError(f"--contexts {contexts!r} must be comma-separated integers, e.g. 128,512,2048"))
    if max_windows < 0:
        _fail(ValueError(f"--max-windows must be 0 (all windows) or more, got {max_windows}"))
    for m in models:
        if not (Path(m) / "config.json").is_file():
            _fail(ValueError(f"MODEL {m} is not a model folder (no config.json): pass converted or original folders"))
    if engine == "vllm":
        options = dict(data=data, window=window, stride=stride, max_windows=max_windows or None, contexts=ctx)
        options.update(new_tokens=new_tokens, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
        return _eval_vllm(list(models), options, kv_memory, as_json)
    try:
        results = compare(
            list(models),
            data=data,
            window=window,
            stride=stride,
            max_windows=max_windows or None,
            contexts=ctx,
            new_tokens=new_tokens,
            device=device,
            tokenizer=tokenizer,
            trust_remote_code=trust_remote_code,
        )
    except (ValueError, OSError) as e:
        _fail(e)
    for r in results:
        for line in r.left_out:
            click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps(as_dicts(results), indent=2))
        return
    r0 = results[0]
    if hasattr(r0, "scoring"):  # an encoder-decoder (convert/eval/seq2seq.py)
        click.echo(f"{r0.scoring()}, text {data or 'pydoc_data topics (second half)'}")
        click.echo(f"decode: {new_tokens} new tokens from a fixed encoder output of each input length, greedy, cached")
        for r in results:
            click.echo(
                f"  {Path(r.model).name}: KV cache {r.self_cache_bytes_per_token:,} B per generated token (self) + "
                f"{r.cross_cache_bytes_per_token:,} B per input token (cross)"
            )
    else:
        click.echo(
            f"perplexity: {r0.windows} windows x {r0.window} tokens, stride {r0.stride}, "
            f"{r0.tokens} tokens scored, text {data or 'pydoc_data topics (second half)'}"
        )
        click.echo(f"decode: {new_tokens} new tokens after each context, greedy, with cache")
    click.echo(format_table(results))


def _eval_vllm(models: list[str], options: dict, kv_memory: str, as_json: bool) -> None:
    """`eval --engine vllm`: the same measurements as vLLM serves the models (convert/serving/vllm_eval.py)."""
    from convert.serving import vllm_eval

    try:
        memory = vllm_eval.parse_memory(kv_memory)
        vllm_eval.require_vllm()
        results = vllm_eval.compare_vllm(models, kv_memory=memory, **options)
    except (ValueError, OSError) as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(vllm_eval.as_dicts(results), indent=2))
        return
    r0 = results[0]
    click.echo(
        f"vLLM: perplexity {r0.windows} windows x {r0.window} tokens, stride {r0.stride}, {r0.tokens} tokens "
        f"scored, text {options['data'] or 'pydoc_data topics (second half)'}"
    )
    click.echo("decode: batch 1 after each context, greedy, timed from vLLM's first to last token")
    click.echo(vllm_eval.format_table(results))


@main.command()
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the models: mean/, calibrated/, uptrained/model/ (default: in the gqa-convert cache).",
)
@click.option("--num-kv-heads", "-g", type=int, default=1, show_default=True, help="KV heads after conversion.")
@click.option("--windows", type=int, default=4, show_default=True, help="512-token windows scored per model.")
@click.option(
    "--calibration-tokens",
    type=int,
    default=4096,
    show_default=True,
    help="Tokens the calibrated model is fitted on (the method's default is 8192; fewer keep the demo short).",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True, help="Calibrate on."
)
@click.option(
    "--uptrain-seconds",
    type=float,
    default=60.0,
    show_default=True,
    help="Wall-clock seconds of distilling the calibrated model from the original (0: no uptraining).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(
    output: str | None,
    num_kv_heads: int,
    windows: int,
    calibration_tokens: int,
    device: str,
    uptrain_seconds: float,
    quiet: bool,
    as_json: bool,
) -> None:
    """Convert the real SmolLM2-135M (shipped on PyPI, offline) from 3 KV heads to NUM_KV_HEADS by mean pooling and
    by calibration, uptrain the calibrated one for about a minute, and show the models side by side."""
    from convert.demo import format_demo, run_demo
    from convert.errors import SettingsError, TrainingError

    try:
        r = run_demo(
            output,
            num_kv_heads,
            windows,
            calibration_tokens,
            device,
            progress=not (quiet or as_json),
            uptrain_seconds=uptrain_seconds,
        )
    except (ConversionError, FileNotFoundError, SettingsError, TrainingError, MissingExtra) as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(format_demo(r))


def _keep_freed_memory() -> None:
    """glibc: serve blocks up to 32 MB from the heap and keep freed memory there. By default a tensor of a few MB
    is a fresh mmap that the kernel must fault in and zero, page by page, each time: converting one layer's K/V from
    bf16 to float32 then took 14 ms instead of 4 (measured on 2 cores). Set for `convert` only, not in the library
    (the process is the CLI's own) and not for `eval`, whose memory readings would keep what one model freed."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's largest allowed value on 64-bit
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep freed memory for the next layer


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def uptrain(args: tuple[str, ...]) -> None:
    """Uptrain a converted checkpoint in this process: CONFIG.yaml [key=value ...] [--quiet] [--json].

    CONFIG is a YAML file or a shipped config name (e.g. smollm2-mqa-cpu); `--help` lists every setting. For
    several processes: `accelerate launch [options] -m convert.uptrain CONFIG.yaml ...`.
    """

    try:
        from convert.uptrain import main as uptrain_main
    except MissingExtra as e:
        _fail(e)
    sys.exit(uptrain_main(list(args)))


def entry() -> None:
    """The console script: `main`, then exit without tearing the interpreter down.

    Every output file is closed (and, with --fsync, on disk) by then; the teardown only frees modules, torch's
    took half a second of a two-second conversion. Exceptions other than SystemExit go to Python's own handler.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
