"""The torch-free path: mean and first pooling of a safetensors checkpoint run on numpy alone, and must write the
very bytes the torch methods write; everything else goes through torch. Plus the console script's exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from convert import convert_checkpoint
from convert.families import family_for, stock_kv_model_types
from convert.io.safetensors import TensorInfo, float32_to, read_float32
from convert.pipeline.planning import plan_tensors
from convert.pipeline.source import open_source
from convert.pipeline.writing import numpy_pool
from tests.helpers.tiny import save, tiny_model

SPLIT = [t for t in stock_kv_model_types() if family_for(t).layout == "split"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return out


def _numpy_path_taken(src, groups: int, method: str, dtype: str = "keep") -> bool:
    source = open_source(src)
    return numpy_pool(source, plan_tensors(source, groups, dtype)[0], method, dtype) is not None


def _assert_same_as_torch(src, out, groups: int, method: str, dtype: str) -> None:
    """Convert again with --dtype set to the source's own dtype: the same numbers, but through torch."""
    assert not _numpy_path_taken(src, groups, method, dtype)
    convert_checkpoint(src, out.parent / "by-torch", groups, method=method, dtype=dtype, progress=False)
    want, got = _tensors(out.parent / "by-torch"), _tensors(out)
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


@pytest.mark.parametrize("model_type", SPLIT)
def test_numpy_mean_writes_the_bytes_of_the_torch_method(model_type, tmp_path):
    """Every split-layout family, bf16 (the usual checkpoint), 4 -> 2 KV heads: numpy and torch agree bit for bit,
    biases (qwen2, phi, starcoder2) and per-head norms (olmo2, cohere) included."""
    model = tiny_model(model_type).to(torch.bfloat16)
    src = save(model, tmp_path / "src")
    assert _numpy_path_taken(src, 2, "mean")
    report = convert_checkpoint(src, tmp_path / "out", 2, progress=False)
    _assert_same_as_torch(src, tmp_path / "out", 2, "mean", "bfloat16")
    assert [r["layer"] for r in report.per_layer] == [0, 1]
    assert all(0 < r["k_rel_err"] < 2 and 0 < r["v_rel_err"] < 2 for r in report.per_layer)


# The fused layouts: phi3's [q | k | v] rows, falcon's grouped (new) and per-head interleaved (classic) rows.
FUSED = {
    "phi3": ("phi3", {}),
    "falcon": ("falcon", {}),
    "falcon_classic": (
        "falcon",
        dict(new_decoder_architecture=False, multi_query=False, parallel_attn=True, num_kv_heads=None),
    ),
}


@pytest.mark.parametrize("case", sorted(FUSED))
@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("groups", [1, 2])
def test_numpy_pools_fused_layouts_to_the_bytes_of_the_torch_method(case, method, groups, tmp_path):
    """A fused q/k/v tensor (and its bias) is pooled on numpy with the rows moved as the torch join moves them:
    falcon classic becomes multi-query (G=1) or the grouped arrangement (G=2)."""
    model_type, overrides = FUSED[case]
    src = save(tiny_model(model_type, seed=1, **overrides).to(torch.bfloat16), tmp_path / "src")
    assert _numpy_path_taken(src, groups, method)
    report = convert_checkpoint(src, tmp_path / "out", groups, method=method, progress=False)
    _assert_same_as_torch(src, tmp_path / "out", groups, method, "bfloat16")
    assert [list(r) for r in report.per_layer] == [["layer", "k_rel_err", "v_rel_err"]] * 2
    assert all(0 < r["k_rel_err"] < 2 and 0 < r["v_rel_err"] < 2 for r in report.per_layer)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "olmo2", "cohere"])
@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_numpy_pooling_matches_torch_for_each_method_and_dtype(model_type, method, dtype, tmp_path):
    model = tiny_model(model_type, seed=3).to(DTYPES[dtype])
    src = save(model, tmp_path / "src")
    assert _numpy_path_taken(src, 1, method)
    convert_checkpoint(src, tmp_path / "out", 1, method=method, progress=False)
    _assert_same_as_torch(src, tmp_path / "out", 1, method, dtype)


def test_relative_errors_match_the_torch_method(tmp_path):
    """The provenance statistics do not depend on the path (float32 sums in another order: close, not equal)."""
    src = save(tiny_model("llama").to(torch.bfloat16), tmp_path / "src")
    by_numpy = convert_checkpoint(src, tmp_path / "a", 2, progress=False)
    by_torch = convert_checkpoint(src, tmp_path / "b", 2, dtype="bfloat16", progress=False)
    assert len(by_numpy.per_layer) == len(by_torch.per_layer) == 2
    for a, b in zip(by_numpy.per_layer, by_torch.per_layer):
        assert list(a) == list(b) == ["layer", "k_rel_err", "v_rel_err"]
        assert a["k_rel_err"] == pytest.approx(b["k_rel_err"], rel=1e-5)
        assert a["v_rel_err"] == pytest.approx(b["v_rel_err"], rel=1e-5)


@pytest.mark.parametrize("case", ["random", "calibrated", "dtype", "pickle"])
def test_torch_does_what_numpy_cannot(case, tmp_path):
    """Random heads (torch's generator), calibration, dtype changes and pickles stay on torch."""
    model = tiny_model("llama")
    src = tmp_path / "src"
    if case == "pickle":  # what older transformers wrote: config.json beside a pickled state dict
        src.mkdir()
        model.config.save_pretrained(src)
        torch.save(model.state_dict(), src / "pytorch_model.bin")
        source = open_source(src, allow_pickle=True)
        assert source.pickle
    else:
        source = open_source(save(model, src))
    method = case if case in ("random", "calibrated") else "mean"
    dtype = "float16" if case == "dtype" else "keep"
    assert numpy_pool(source, plan_tensors(source, 2, dtype)[0], method, dtype) is None


@pytest.mark.parametrize("st", ["BF16", "F16", "F32"])
def test_rounding_is_torchs(st, tmp_path):
    """float32 -> bf16/f16 rounding (ties to even, overflow to inf, NaN, subnormals) and the way back equal torch's."""
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[st]
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            -1.5,
            float("inf"),
            -float("inf"),
            float("nan"),
            3.4e38,
            -3.4e38,
            65504.0,
            65520.0,
            1e-40,
            -1e-45,
            6e-8,
            1.00390625,
            1.01171875,
            1 + 2**-8,
            1 + 3 * 2**-8,
        ]
    )
    x = torch.cat([special, torch.randn(4096) * torch.logspace(-30, 30, 4096)])
    got = float32_to(x.numpy(), st)
    want = x.to(dtype).view({2: torch.int16, 4: torch.int32}[dtype.itemsize]).numpy()
    nan = x.isnan().numpy()
    # NaN stays NaN; its bits are not compared (torch itself writes 0x7fc0 or 0xffff, scalar or vector code).
    assert np.array_equal(got.view(want.dtype)[~nan], want[~nan])
    # And reading those bytes back as float32, as the streaming path does, equals torch's .float().
    path = tmp_path / "t.bin"
    path.write_bytes(got.tobytes())
    back = read_float32(TensorInfo(path, st, (x.numel(),), offset=0))
    assert np.array_equal(back, x.to(dtype).float().numpy(), equal_nan=True)


def test_mean_and_first_conversions_never_import_torch(tmp_path):
    """Split and fused layouts alike (qwen2, phi3, falcon new and classic): one process, torch never loaded."""
    sources = {"qwen2": save(tiny_model("qwen2").to(torch.bfloat16), tmp_path / "src" / "qwen2")}
    for case, (model_type, overrides) in FUSED.items():
        sources[case] = save(tiny_model(model_type, **overrides).to(torch.bfloat16), tmp_path / "src" / case)
    lines = ["import sys", "from convert import convert_checkpoint"]
    for case, src in sources.items():
        lines += [
            f"convert_checkpoint({str(src)!r}, {str(tmp_path / case / 'mean')!r}, 2, progress=False)",
            f"convert_checkpoint({str(src)!r}, {str(tmp_path / case / 'first')!r}, 1, method='first', progress=False)",
        ]
    lines += [
        f"convert_checkpoint({str(sources['qwen2'])!r}, {str(tmp_path / 'plan')!r}, 1, dry_run=True)",
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]",
    ]
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "qwen2" / "mean" / "config.json").read_text())["num_key_value_heads"] == 2
    assert json.loads((tmp_path / "phi3" / "first" / "config.json").read_text())["num_key_value_heads"] == 1
    assert json.loads((tmp_path / "falcon_classic" / "first" / "config.json").read_text())["multi_query"]
    assert not (tmp_path / "plan").exists()


def test_console_script_exit_codes(tmp_path):
    """The script exits without interpreter teardown: output, messages and exit codes must survive that."""
    src = save(tiny_model("llama"), tmp_path / "src")
    run = [sys.executable, "-m", "convert.cli"]
    ok = subprocess.run(
        [*run, "convert", str(src), str(tmp_path / "out"), "-g", "2", "-q"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(f"wrote {tmp_path / 'out'}")
    assert _tensors(tmp_path / "out")
    bad = subprocess.run([*run, "convert", str(src), str(tmp_path / "bad"), "-g", "3"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "does not divide the 4 KV heads" in bad.stderr
    assert not (tmp_path / "bad").exists()
    usage = subprocess.run([*run, "convert", str(src)], capture_output=True, text=True)
    assert usage.returncode == 2 and "Missing argument 'OUTPUT'" in usage.stderr
    version = subprocess.run([*run, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "gqa-convert" in version.stdout
    js = subprocess.run([*run, "inspect", str(src), "--json"], capture_output=True, text=True)
    assert js.returncode == 0 and json.loads(js.stdout)["num_kv_heads"] == 4


@pytest.mark.parametrize("durable", [False, True])
def test_fsync_puts_every_file_and_the_rename_on_disk(durable, tmp_path, monkeypatch):
    """--fsync: each shard, every side file, the temporary folder, then OUTPUT's parent (the rename) are fsynced
    before the command returns. Without it nothing waits for the disk, as with cp."""
    import os

    from click.testing import CliRunner

    from convert.cli import main

    src = save(tiny_model("llama"), tmp_path / "src")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "-g", "2", "-q", "--max-shard-size", "100KB"] + ["--fsync"] * durable
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    if not durable:
        assert synced == []
        return
    files = sorted(p.name for p in out.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    tmp_names = {os.path.basename(p) for p in synced if ".gqa-tmp-" not in os.path.basename(p)}
    assert set(files) <= tmp_names, set(files) - tmp_names  # every file, by its name in the temporary folder
    assert any(os.path.basename(p).startswith(".out.gqa-tmp-") for p in synced)  # the folder's own entries
    assert synced[-1] == str(tmp_path)  # last: the parent, after the rename


def test_numpy_methods_are_weight_only_pools_in_the_registry():
    """The numpy path skips loading the method: its registry twin must agree that only K/V-side tensors change."""
    from convert.methods import METHODS, HeadPool
    from convert.methods.pooling import WEIGHT_ONLY_POOLS

    for name in WEIGHT_ONLY_POOLS:
        method = METHODS[name]
        assert isinstance(method, HeadPool) and not method.rewrites_queries and not method.needs_calibration


@pytest.mark.parametrize("st", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("method", ["mean", "first"])
def test_pooling_by_columns_gives_the_bits_of_pooling_the_whole_tensor(st, method):
    """K/V of real width span several column blocks, the last one partial; the torch method on the whole tensor,
    rounded once, is the reference, and the error statistic adds up over blocks to the whole tensor's."""
    from convert.methods import array_pool
    from convert.methods.pooling import relative_error
    from convert.pipeline.writing import COLUMN_BLOCK, pool_columns

    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[st]
    hkv, groups, cols = 8, 2, 2 * COLUMN_BLOCK + 1000
    x = (torch.randn(hkv, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    stored = x.view({2: torch.int16, 4: torch.int32}[x.itemsize]).numpy()
    stored = stored.view({"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[st])
    got, error = pool_columns(stored, st, groups, array_pool(method))
    want = x.float().reshape(groups, hkv // groups, cols)
    pooled = want.mean(1) if method == "mean" else want[:, 0]  # float32
    want = pooled.to(dtype)
    assert got.shape == (groups, cols)
    assert np.array_equal(got.view(np.uint8), want.view(torch.uint8).numpy().reshape(groups, -1))
    whole = relative_error(x.float().numpy(), pooled.numpy())
    assert error == pytest.approx(whole, rel=1e-5) and error > 0.1


def test_header_pad_aligns_the_most_copied_bytes_with_their_source_pages():
    from convert.io.safetensors import header_pad

    assert header_pad(100, []) == 4  # nothing copied: 8-byte alignment only, as the safetensors writer pads
    # (offset in the data, absolute source offset, bytes): 3 MB want phase 8, 1 MB want phase 2048
    pad = header_pad(1000, [(0, 1008 + 4096, 1 << 20), (4096, 1000 + 4096 + 8 + 8192, 2 << 20), (0, 3048, 1 << 20)])
    assert pad == 8 and (1000 + pad) % 8 == 0
    assert header_pad(1000, [(0, 1003, 1 << 20)]) == 0  # a phase that would break 8-byte alignment is not taken


def test_copied_tensors_sit_at_their_source_offsets_within_a_page(tmp_path):
    """The output's header is padded so that the bulk of the verbatim copies keep their position within a page."""
    from convert.io.safetensors import read_header

    model = tiny_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=3)
    src = save(model, tmp_path / "src", shard="1GB")
    convert_checkpoint(src, tmp_path / "out", 1, progress=False)
    source, out = {}, {}
    for folder, headers in ((src, source), (tmp_path / "out", out)):
        for f in folder.glob("*.safetensors"):
            headers.update(read_header(f)[0])
    same = [k for k in out if out[k].shape == source[k].shape]
    aligned = sum(out[k].nbytes for k in same if (out[k].offset - source[k].offset) % 4096 == 0)
    assert aligned >= 0.8 * sum(out[k].nbytes for k in same)
    assert all(t.offset % 8 == 0 for t in out.values())
    loaded = _tensors(tmp_path / "out")  # the padded header still loads with safetensors itself
    assert set(loaded) == set(out)


def test_verbatim_copy_reaches_a_64k_boundary_of_the_output_first(tmp_path, monkeypatch):
    """copy_raw's first kernel copy ends where the output is 64 KiB aligned, the rest goes in one call; the bytes
    land where they belong."""
    import os

    from convert.io.safetensors import WRITE_ALIGN, copy_raw

    data = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(b"x" * 40 + data)
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2:]) or real(*a))
    with open(tmp_path / "out", "wb") as out:
        copy_raw(TensorInfo(tmp_path / "src", "U8", (len(data),), offset=40), out.fileno(), 1000)
    assert (tmp_path / "out").read_bytes()[1000:] == data
    assert calls[0] == (WRITE_ALIGN - 1000, 40, 1000)
    assert calls[1] == (len(data) - (WRITE_ALIGN - 1000), 40 + WRITE_ALIGN - 1000, WRITE_ALIGN)
