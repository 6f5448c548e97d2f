"""Checkpoint folders in and out: resolve SOURCE, check everything before writing, stream the conversion into a
temporary folder beside OUTPUT, verify it, and only then rename it into place.

Memory stays flat: tensors are read one at a time with plain file reads, tensors the conversion does not touch are
copied inside the kernel on a background thread, and output shards are written with headers declared up front.
"""

from __future__ import annotations

import importlib
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.families import QK_NORM_FAMILIES, Shapes
from convert.families.mha import modeling_template
from convert.io.safetensors import fsync_path, nbytes, sync_folder
from convert.methods import array_pool, get_method, method_class, method_module, method_names
from convert.pipeline.merge import check_groups, kv_cache_bytes_per_token
from convert.pipeline.output import (
    OutputLock,
    check_output,
    is_write_error,
    move_into_place,
    remove_stale_temp_folders,
    temp_folder,
    write_error,
)
from convert.pipeline.planning import OutTensor, assign_shards, output_st, parse_size, plan_tensors
from convert.pipeline.report import PROVENANCE, Report, model_card, provenance
from convert.pipeline.settings import DTYPE_CHOICES, Settings
from convert.pipeline.source import SIDE_FILES, Source, open_source
from convert.pipeline.writing import (
    copy_side_files,
    numpy_layers,
    numpy_pool,
    torch_layers,
    verify_output,
    write_shards,
    write_text,
)
from convert.routes.shipped import (
    check_method,
    load_hint,
    require_flag,
    ship_modeling_code,
    shipped_note,
    template_manifest,
)

if TYPE_CHECKING:  # torch loads on a background thread during a conversion (see Conversion.open)
    from convert.methods import Method


# ---------------------------------------------------------------------------------------------------------------
# Converting, phase by phase


class Conversion:
    """One conversion of SOURCE into OUTPUT, in phases that run top to bottom (`run`):

    open    read SOURCE's config and shard headers (no tensor data); start torch loading when it will be needed;
            whether the output needs modeling code of its own (no stock class holds G KV heads)
    plan    every output tensor's dtype, shape and shard; whether numpy alone can do the merge
    check   OUTPUT: a usable path, room on disk, the lock beside it; then the temporary folder
    write   the shards, the config, tokenizer files, model card and provenance, all in the temporary folder
    verify  re-open the temporary folder as a checkpoint and compare it with the plan
    finish  (--fsync: put it on disk,) rename it to OUTPUT in one step

    Nothing outside the temporary folder and the lock file is written before `finish`; whatever fails, `clean_up`
    removes both and restores the torch thread count.
    """

    # Set by open and plan:
    src: Source
    template: Any  # the modeling code to ship with the output, or None: a stock transformers class loads it
    tensors: list[OutTensor]  # every output tensor, in layer order
    s_out: Shapes
    pool: Callable | None  # the numpy pooling function, or None: a torch method merges
    shards: list[list[OutTensor]]
    bytes_out: int

    def __init__(self, source: str | Path, output: str | Path, groups: int, method: str, settings: Settings) -> None:
        self.source, self.output, self.groups, self.method = source, Path(output), groups, method
        self.settings = settings
        self.options = settings.method_options or {}
        self.methods: Callable[[], Any] | None = None  # waits for convert.methods (and torch) to finish importing
        self.merger: Method | None = None
        self.report: Report | None = None
        self.lock: OutputLock | None = None
        self.tmp: Path | None = None
        self.threads: int | None = None  # torch's thread count before this run changed it

    def run(self) -> Report:
        self.open()
        self.plan()
        if self.settings.dry_run:
            rewrites = self.pool is None and self._load_merger().rewrites_queries
            return self._new_report(rewrites)
        try:
            self.check()
            self.write()
            self.verify()
            self.finish()
        except OSError as e:
            if not is_write_error(e, self.output):
                raise
            largest = max(sum(nbytes(t.st, t.shape) for t in shard) for shard in self.shards)
            raise write_error(e, self.output, self.bytes_out, largest) from e
        finally:
            self.clean_up()
        return self.report

    # --- open ----------------------------------------------------------------------------------------------------

    def open(self) -> None:
        s = self.settings
        if s.dtype not in DTYPE_CHOICES:
            raise ConversionError(f"--dtype {s.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        # Mean and first pooling of a plain checkpoint need no torch (see numpy_pool). Any other conversion starts
        # torch and the merge methods loading on a thread now, while the checkpoint is checked and planned from
        # its headers and the untouched tensors start copying: the import then costs no wall time of its own.
        if array_pool(self.method) is None or self.options:
            self.methods = _import_in_background(method_module(self.method))
        self.src = open_source(self.source, s.revision, s.allow_pickle, s.trust_remote_code, groups=self.groups)
        check_groups(self.groups, self.src.shapes)
        self.template = modeling_template(self.src.family, self.groups, self.src.shapes.num_heads)
        if self.template:
            what = f"{self.src.raw_config['model_type']} with {self.groups} KV heads"
            require_flag(self.template, s.write_modeling_code, what)
            check_method(self.template, self.method)

    # --- plan ----------------------------------------------------------------------------------------------------

    def plan(self) -> None:
        s = self.settings
        self.tensors, self.s_out = plan_tensors(self.src, self.groups, s.dtype)
        self.pool = numpy_pool(self.src, self.tensors, self.method, s.dtype, s.method_options)
        if self.pool is None and self.methods is None:
            self.methods = _import_in_background(method_module(self.method))
        self.shards = assign_shards(self.tensors, parse_size(s.max_shard_size))
        self.bytes_out = sum(nbytes(t.st, t.shape) for t in self.tensors)

    def _new_report(self, rewrites_queries: bool) -> Report:
        src, s_in, dtype = self.src, self.src.shapes, self.settings.dtype
        first_kv = src.family.attention_keys(0, set(src.tensors))[0]
        out_st = output_st(src.tensors[first_kv].st, dtype)  # the dtype the KV cache will have
        report = Report(
            source=src.name,
            output=str(self.output),
            model_type=src.raw_config["model_type"],
            method=self.method,
            num_heads=s_in.num_heads,
            kv_heads_before=s_in.num_kv_heads,
            kv_heads_after=self.groups,
            head_dim=s_in.head_dim,
            dtype=dtype,
            tensors_total=len(self.tensors),
            tensors_touched=[t.name for t in self.tensors if t.computed(rewrites_queries)],
            bytes_in=src.nbytes,
            bytes_out=self.bytes_out,
            shards_out=len(self.shards),
            kv_cache_bytes_per_token_before=kv_cache_bytes_per_token(s_in, s_in.num_kv_heads, out_st),
            kv_cache_bytes_per_token_after=kv_cache_bytes_per_token(s_in, self.groups, out_st),
            dry_run=self.settings.dry_run,
        )
        report.output_model_type = src.raw_config["model_type"]
        if src.route is not None:  # a stock re-expression route: the source is another class than the output's
            report.model_type = src.route.source_model_type
            report.route, report.load_with = src.route.route, src.route.load_with
            report.bytes_in = src.route.source_bytes
            report.notes.extend(src.route.notes)
        elif src.raw_config.get("is_encoder_decoder"):  # T5 at G = H: the stock seq2seq class loads it
            report.load_with = report.load_with.replace("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")
        if self.template:
            manifest = template_manifest(self.template)
            report.notes.append(shipped_note(self.template))
            report.route, report.load_with = "shipped code", load_hint(manifest["loads_with"])
            report.output_model_type = manifest["model_type"]
        if src.family.cache_notes is not None:
            report.notes += src.family.cache_notes(s_in, s_in.num_kv_heads, self.groups, nbytes(out_st, ()))
        if src.raw_config["model_type"] in QK_NORM_FAMILIES:
            report.notes.append(
                "this family normalizes keys per head after the projection (q/k norm): merged keys are pooled "
                "before that norm, so the merge is approximate on the key side even when weights agree"
            )
        return report

    # --- check ---------------------------------------------------------------------------------------------------

    def check(self) -> None:
        """OUTPUT is checked before anything is created, then again under the lock (another run may have just
        finished it); only then are this host's dead runs' temporary folders removed and ours created."""
        s, output = self.settings, self.output
        check_output(self.src.folder, output, s.overwrite, self.bytes_out)
        output.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock(output).acquire()
        check_output(self.src.folder, output, s.overwrite, self.bytes_out)
        remove_stale_temp_folders(output)
        self.tmp = temp_folder(output)
        self.tmp.mkdir()

    # --- write ---------------------------------------------------------------------------------------------------

    def write(self) -> None:
        s, tmp = self.settings, self.tmp
        write_shards(self.shards, tmp, self._start_merging, s.progress, s.durable)
        raw = self.src.family.patch_config(self.src.raw_config, self.groups)
        if self.template:
            raw = ship_modeling_code(self.template, tmp, raw, self.groups)
        if s.dtype != "keep":
            raw["dtype"] = s.dtype
            raw.pop("torch_dtype", None)
        write_text(tmp / "config.json", json.dumps(raw, indent=2, sort_keys=True) + "\n")
        copy_side_files(self.src.folder, tmp, SIDE_FILES)
        write_text(tmp / "README.md", model_card(self.report, self.src.name))
        settings = {"seed": s.seed, "revision": s.revision, "max_shard_size": str(s.max_shard_size), **self.options}
        write_text(tmp / PROVENANCE, json.dumps(provenance(self.report, settings), indent=2) + "\n")
        if self.merger is not None:
            self.merger.finish(tmp, self.report)

    def _start_merging(self) -> tuple[Callable[[int], dict], bool]:
        """Called by write_shards once the pass-through copies are under way: the merge of one layer, and whether
        it rewrites queries and outputs too. A torch method waits here for the import started in `open`."""
        if self.pool is not None:
            self.report = self._new_report(rewrites_queries=False)
            return numpy_layers(self.src, self.tensors, self.pool, self.s_out, self.report), False
        import torch

        merger = self.merger = self._load_merger()
        if not merger.needs_calibration:
            # Weight-only merges are a few small, memory-bound ops per layer: one torch thread leaves the other
            # core to the copier (two made the merge twice as slow on 2 cores). Restored by clean_up.
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
        self.report = self._new_report(merger.rewrites_queries)
        context = merger.layer_contexts(self.src, self.groups, self.settings.seed, **self.options)
        compute = torch_layers(self.src, self.tensors, merger, self.s_out, self.settings.seed, context, self.report)
        return compute, merger.rewrites_queries

    def _load_merger(self) -> "Method":
        return _load_method(self.methods(), self.method, self.settings.method_options)

    # --- verify --------------------------------------------------------------------------------------------------

    def verify(self) -> None:
        verify_output(self.tmp, self.src, {t.name: t.shape for t in self.tensors}, self.groups)

    # --- finish --------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        if self.settings.durable:
            sync_folder(self.tmp)
        move_into_place(self.tmp, self.output)
        if self.settings.durable:
            fsync_path(self.output.parent)  # the rename itself

    def clean_up(self) -> None:
        """Runs whatever happened: the temporary folder (gone already after a successful finish), the lock, and
        torch's thread count."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
            self.threads = None


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    num_kv_heads: int,
    method: str = "mean",
    *,
    dtype: str = "keep",
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    progress: bool = True,
    method_options: dict[str, Any] | None = None,
    durable: bool = False,
    write_modeling_code: bool = False,
) -> Report:
    """Convert the checkpoint at SOURCE (folder or hub id) to `num_kv_heads` KV heads, written at OUTPUT.

    The checkpoint and OUTPUT are checked before anything is written; OUTPUT appears only when complete and
    verified; SOURCE is never modified. A killed process leaves no OUTPUT (or the one it was replacing); `durable`
    (--fsync) also covers a power loss: every file is on disk before the rename (what `cp` and `save_pretrained`
    do not wait for).
    """
    settings = Settings(
        dtype=dtype,
        revision=revision,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        seed=seed,
        progress=progress,
        method_options=method_options,
        durable=durable,
        write_modeling_code=write_modeling_code,
    )
    return Conversion(source, output, num_kv_heads, method, settings).run()


def _import_in_background(module: str) -> Callable[[], Any]:
    """Start importing `module` on a thread (torch takes about a second); the returned function waits for it and
    returns the module, or raises what the import raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["module"] = importlib.import_module(module)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="gqa-import", daemon=True)
    thread.start()

    def wait() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["module"]

    return wait


def _load_method(module: Any, name: str, options: dict[str, Any] | None) -> "Method":
    """A new method object for this conversion (`module`: its module, imported in the background)."""

    merger = get_method(name)
    if options and not merger.needs_calibration:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        calibrated = ", ".join(n for n in method_names() if method_class(n).needs_calibration)
        raise ConversionError(
            f"{flags}: only for calibrated methods ({calibrated}); --method {name} reads the weights alone"
        )
    return merger
