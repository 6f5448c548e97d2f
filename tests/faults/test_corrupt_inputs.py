"""Corrupt inputs, systematically: safetensors headers, shard indexes and configs broken one way at a time, and
random header byte flips with fixed seeds. Each must be refused through the CLI with exit 2 and exactly one
`error:` line that names the broken file and the fix, with no traceback, no OUTPUT and the source untouched."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from convert.cli import main
from tests.helpers.tiny import save, tiny_model

INDEX = "model.safetensors.index.json"
FIXES = ("re-download", "re-save", "fix ", "fetch")  # every message says how to get a good file


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A sharded tiny llama (4 KV heads), built once; every case works on a copy."""
    return save(tiny_model("llama"), tmp_path_factory.mktemp("pristine") / "src", shard="40KB")


@pytest.fixture
def src(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def shard_with(folder: Path, fragment: str) -> Path:
    index = json.loads((folder / INDEX).read_text())["weight_map"]
    return folder / next(v for k, v in index.items() if fragment in k)


# --- editing files ------------------------------------------------------------------------------------------------


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_file(path: Path, header: dict | str, data: bytes) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_tensor(header: dict, fragment: str = "k_proj") -> str:
    return next(k for k in header if fragment in k)


def header_edit(fragment: str, edit):
    """Change the header of the shard that holds a tensor named like `fragment`; `edit(header, name)`."""

    def apply(folder: Path) -> Path:
        path = shard_with(folder, fragment)
        header, data = split_file(path)
        edit(header, first_tensor(header, fragment))
        write_file(path, header, data)
        return path

    return apply


def set_field(fragment: str, key: str, value):
    return header_edit(fragment, lambda h, name: h[name].__setitem__(key, value))


def raw_bytes(fn):
    """Rewrite the bytes of the shard holding a k_proj: `fn(bytes) -> bytes`."""

    def apply(folder: Path) -> Path:
        path = shard_with(folder, "k_proj")
        path.write_bytes(fn(path.read_bytes()))
        return path

    return apply


def set_length(value: int):
    return raw_bytes(lambda b: struct.pack("<Q", value) + b[8:])


def header_text(text: str):
    def apply(folder: Path) -> Path:
        path = shard_with(folder, "k_proj")
        write_file(path, text, split_file(path)[1])
        return path

    return apply


def overlap(h: dict, name: str) -> None:
    """A tensor's range starts 4 bytes early, inside the tensor before it."""
    later = next(k for k in h if k != "__metadata__" and h[k]["data_offsets"][0] > 0)
    h[later]["data_offsets"] = [n - 4 for n in h[later]["data_offsets"]]


def gap(h: dict, name: str) -> None:
    """Every tensor moves 8 bytes on: the data starts with 8 bytes no tensor claims (and the end is missing)."""
    for k, v in h.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]


def rename(h: dict, name: str) -> None:
    h[name.replace("k_proj", "k_prox")] = h.pop(name)


def drop(h: dict, name: str) -> None:
    """The tensor disappears from the header; its bytes stay, unclaimed."""
    del h[name]


def index_edit(edit):
    def apply(folder: Path) -> Path:
        path = folder / INDEX
        index = json.loads(path.read_text())
        edit(index)
        path.write_text(json.dumps(index))
        return path

    return apply


def duplicate_in_two_shards(folder: Path) -> Path:
    """A tensor that is also in another shard: a stale shard from an earlier download. The index names one."""
    files = shards(folder)
    a, b = files[0], files[-1]
    ha, da = split_file(a)
    hb, db = split_file(b)
    name = next(k for k in ha if k != "__metadata__")
    start, stop = ha[name]["data_offsets"]
    end = max(v["data_offsets"][1] for k, v in hb.items() if k != "__metadata__")
    hb[name] = {**ha[name], "data_offsets": [end, end + stop - start]}
    write_file(b, hb, db + da[start:stop])
    return b


def index_moves(folder: Path) -> Path:
    """The index says a tensor is in another shard than the one that holds it."""
    path = folder / INDEX
    index = json.loads(path.read_text())
    files = [p.name for p in shards(folder)]
    name = next(k for k in index["weight_map"] if "k_proj" in k)
    index["weight_map"][name] = next(f for f in files if f != index["weight_map"][name])
    path.write_text(json.dumps(index))
    return path


def config_edit(key: str, value=None, delete: bool = False):
    def apply(folder: Path) -> Path:
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        if delete:
            raw.pop(key)
        else:
            raw[key] = value
        path.write_text(json.dumps(raw))
        return path

    return apply


def write_text(name: str, text: str):
    def apply(folder: Path) -> Path:
        (folder / name).write_text(text)
        return folder / name

    return apply


CASES = {
    # safetensors: the length field
    "length_beyond_file": set_length(10**9),
    "length_zero": set_length(0),
    "length_too_short": set_length(16),
    "length_huge": set_length(2**63),
    "file_too_short": raw_bytes(lambda b: b[:5]),
    "file_empty": raw_bytes(lambda b: b""),
    # safetensors: the JSON
    "json_garbage": header_text("{this is not json"),
    "json_not_object": header_text("[1, 2, 3]"),
    "json_not_utf8": raw_bytes(lambda b: b[:8] + b"\xff\xfe" + b[10:]),
    "metadata_not_object": header_edit("k_proj", lambda h, n: h.__setitem__("__metadata__", [1])),
    "entry_not_object": header_edit("k_proj", lambda h, n: h.__setitem__(n, 5)),
    # safetensors: dtypes
    "dtype_unknown": set_field("k_proj", "dtype", "F31"),
    "dtype_missing": header_edit("k_proj", lambda h, n: h[n].pop("dtype")),
    "dtype_not_string": set_field("k_proj", "dtype", 32),
    "dtype_other_size": set_field("k_proj", "dtype", "F16"),
    "dtype_integer_same_size": set_field("k_proj", "dtype", "I32"),
    # safetensors: offsets and data
    "offsets_missing": header_edit("k_proj", lambda h, n: h[n].pop("data_offsets")),
    "offsets_one_number": set_field("k_proj", "data_offsets", [0]),
    "offsets_negative": set_field("k_proj", "data_offsets", [-8, 2040]),
    "offsets_reversed": header_edit(
        "k_proj", lambda h, n: h[n].__setitem__("data_offsets", h[n]["data_offsets"][::-1])
    ),
    "offsets_floats": header_edit("k_proj", lambda h, n: h[n].__setitem__("data_offsets", [0.5, 1.5])),
    "offsets_overlap": header_edit("k_proj", overlap),
    "offsets_gap": header_edit("k_proj", gap),
    "offsets_beyond_file": header_edit("k_proj", lambda h, n: h[n].__setitem__("data_offsets", [10**9, 10**9 + 1024])),
    "data_truncated": raw_bytes(lambda b: b[:-4]),
    "data_extra_bytes": raw_bytes(lambda b: b + b"\0" * 16),
    "tensor_dropped": header_edit("k_proj", drop),
    # safetensors: shapes
    "shape_wrong_size": set_field("k_proj", "shape", [3, 64]),
    "shape_negative": set_field("k_proj", "shape", [-32, -64]),
    "shape_not_list": set_field("k_proj", "shape", "32x64"),
    "shape_strings": set_field("k_proj", "shape", ["32", "64"]),
    "shape_same_size_other_rows": set_field("k_proj", "shape", [64, 32]),
    # index
    "index_garbage": write_text(INDEX, "{nope"),
    "index_list": write_text(INDEX, "[]"),
    "index_no_weight_map": index_edit(lambda i: i.pop("weight_map")),
    "index_weight_map_list": index_edit(lambda i: i.__setitem__("weight_map", ["a"])),
    "index_empty_weight_map": index_edit(lambda i: i.__setitem__("weight_map", {})),
    "index_value_not_string": index_edit(lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), 3)),
    "index_path_outside": index_edit(
        lambda i: i["weight_map"].__setitem__(next(iter(i["weight_map"])), "../model.safetensors")
    ),
    "index_names_missing_shard": index_edit(
        lambda i: i["weight_map"].__setitem__("extra.weight", "model-x.safetensors")
    ),
    "index_lists_absent_tensor": index_edit(
        lambda i: i["weight_map"].__setitem__("extra.weight", next(iter(i["weight_map"].values())))
    ),
    "index_omits_tensor": index_edit(lambda i: i["weight_map"].pop(next(k for k in i["weight_map"] if "norm" in k))),
    "index_wrong_shard": index_moves,
    "tensor_in_two_shards": duplicate_in_two_shards,
    "tensor_renamed_in_shard": header_edit("k_proj", rename),
    # config
    "config_garbage": write_text("config.json", "{nope"),
    "config_list": write_text("config.json", "[1]"),
    "config_no_model_type": config_edit("model_type", delete=True),
    "config_model_type_number": config_edit("model_type", 5),
    "config_heads_missing": config_edit("num_attention_heads", delete=True),
    "config_heads_zero": config_edit("num_attention_heads", 0),
    "config_heads_negative": config_edit("num_attention_heads", -8),
    "config_heads_string": config_edit("num_attention_heads", "8"),
    "config_heads_float": config_edit("num_attention_heads", 8.0),
    "config_heads_bool": config_edit("num_attention_heads", True),
    "config_heads_wrong": config_edit("num_attention_heads", 4),
    "config_hidden_missing": config_edit("hidden_size", delete=True),
    "config_hidden_zero": config_edit("hidden_size", 0),
    "config_hidden_wrong": config_edit("hidden_size", 32),
    "config_layers_missing": config_edit("num_hidden_layers", delete=True),
    "config_layers_zero": config_edit("num_hidden_layers", 0),
    "config_layers_fewer": config_edit("num_hidden_layers", 1),
    "config_layers_more": config_edit("num_hidden_layers", 3),
    "config_kv_zero": config_edit("num_key_value_heads", 0),
    "config_kv_negative": config_edit("num_key_value_heads", -4),
    "config_kv_string": config_edit("num_key_value_heads", "4"),
    "config_kv_not_dividing": config_edit("num_key_value_heads", 3),
    "config_kv_more_than_heads": config_edit("num_key_value_heads", 16),
    "config_kv_wrong": config_edit("num_key_value_heads", 2),
    "config_head_dim_zero": config_edit("head_dim", 0),
    "config_head_dim_wrong": config_edit("head_dim", 16),
    "config_rope_not_object": config_edit("rope_parameters", [1]),
    "config_rotary_factor_zero": config_edit("partial_rotary_factor", 0),
    "config_rotary_factor_big": config_edit("partial_rotary_factor", 2.0),
    "config_rotary_factor_string": config_edit("partial_rotary_factor", "half"),
}


def refused(src: Path, out: Path) -> str:
    """Run the CLI on a corrupted SOURCE; check exit 2, one error line, no OUTPUT, no temp folder, and return it."""
    before = digest(src)
    result = CliRunner().invoke(main, ["convert", str(src), str(out), "-g", "2", "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.gqa-*"))
    assert digest(src) == before
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_corrupt_input_is_refused_naming_the_file_and_the_fix(case, src, tmp_path):
    broken = CASES[case](src)
    line = refused(src, tmp_path / "out")
    assert broken.name in line, line
    assert any(fix in line.lower() for fix in FIXES), line


def test_a_tensor_in_two_shards_was_silently_dropped_and_is_now_refused(src, tmp_path):
    """The reported case: the index names one shard, a stale second shard holds the same name. The intact
    checkpoint converts; with the stale shard it is refused before anything is written."""
    ok = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "before"), "-g", "2", "-q"])
    assert ok.exit_code == 0, ok.output
    duplicate_in_two_shards(src)
    line = refused(src, tmp_path / "out")
    assert "also holds" in line


def _flip_positions(path: Path) -> list[int]:
    """Header bytes whose change must be caught: the length field and the tensor entries (not the free-form
    __metadata__ values and not the trailing padding, where some changes are still a valid file)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n]
    meta = text.find(b'"__metadata__"')
    meta_end = text.index(b"}", meta) + 1 if meta >= 0 else -1
    last = text.rstrip(b" ").rfind(b"}") + 1
    return [p for p in range(8)] + [8 + i for i in range(last) if not (meta <= i < meta_end)]


@pytest.mark.parametrize("seed", range(50))
def test_random_header_byte_flip_is_refused(seed, src, tmp_path):
    rng = random.Random(seed)
    path = rng.choice(shards(src))
    raw = bytearray(path.read_bytes())
    position = rng.choice(_flip_positions(path))
    raw[position] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(raw))
    line = refused(src, tmp_path / "out")
    assert any(fix in line.lower() for fix in FIXES), line


def test_real_process_prints_one_line_and_no_traceback(src, tmp_path):
    """The same through a real process: stderr is the one error line, stdout is empty."""
    set_field("k_proj", "dtype", "I32")(src)
    cmd = [sys.executable, "-m", "convert.cli", "convert", str(src), str(tmp_path / "out"), "-g", "2", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
