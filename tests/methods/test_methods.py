"""The methods package: a torch-free registry, a new method object per conversion, declared calibrated options,
layer-by-layer calibration that keeps no layer in memory, and the --device option."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from convert import convert_checkpoint
from convert.errors import ConversionError
from convert.methods import METHODS, REGISTRY, array_pool, get_method, method_class, method_names
from convert.methods.base import Method
from convert.methods.calibrated import CalibratedOptions
from convert.methods.pooling import HeadPool
from tests.helpers.tiny import save, tiny_model

RANDOM = dict(calibration_data="random", calibration_seq_len=48)


def test_registry_imports_no_torch():
    """The CLI lists the methods and the fast path asks for array pools before torch is imported."""
    code = (
        "import sys, convert.cli, convert.methods as m, convert.methods.pooling\n"
        "assert m.array_pool('mean') is not None and m.array_pool('calibrated') is None\n"
        "assert m.method_names() == list(m.METHODS)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_name_is_one_class_of_that_name():
    for name in method_names():
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name and cls.summary
        assert REGISTRY[name].endswith(f":{cls.__name__}")
        pool = array_pool(name)
        # A numpy pool is a promise that only K/V-side tensors change, from the weights alone.
        if pool is not None:
            assert issubclass(cls, HeadPool) and not cls.rewrites_queries and not cls.needs_calibration
    assert array_pool("mean") is not None and array_pool("first") is not None
    assert array_pool("random") is None and array_pool("calibrated") is None and array_pool("nope") is None


def test_each_lookup_is_a_new_object():
    assert get_method("calibrated") is not get_method("calibrated")
    assert METHODS["mean"] is not METHODS["mean"] and isinstance(METHODS["mean"], HeadPool)
    with pytest.raises(ConversionError, match="unknown method 'median': choose one of mean, first"):
        get_method("median")
    with pytest.raises(KeyError):
        METHODS["median"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_two_conversions_in_one_process_share_nothing(tmp_path):
    """Two calibrated conversions with different options, run at the same time on two threads, write exactly
    what each writes alone: no method state (options, activations, the pending layer) is shared."""
    src = save(tiny_model("llama"), tmp_path / "src")
    runs = {
        "a": dict(RANDOM, calibration_tokens=192, grouping="contiguous"),
        "b": dict(RANDOM, calibration_tokens=384, grouping="similarity", stream="converted", ridge=0.1),
    }
    alone = {}
    for name, opts in runs.items():
        convert_checkpoint(src, tmp_path / f"alone-{name}", 2, "calibrated", progress=False, method_options=opts)
        alone[name] = _files(tmp_path / f"alone-{name}")
    assert alone["a"] != alone["b"]
    errors: list[BaseException] = []

    def convert(name: str) -> None:
        try:
            convert_checkpoint(
                src, tmp_path / f"together-{name}", 2, "calibrated", progress=False, method_options=runs[name]
            )
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=convert, args=(n,)) for n in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, opts in runs.items():
        assert _files(tmp_path / f"together-{name}") == alone[name]
        cal = json.loads((tmp_path / f"together-{name}" / "gqa_convert.json").read_text())["calibration"]
        assert cal["calibration_tokens"] == opts["calibration_tokens"] and cal["grouping"] == opts["grouping"]


def test_options_are_declared_with_bounds():
    opts = CalibratedOptions.parse({"calibration_tokens": None})
    assert opts.calibration_tokens == 8192 and opts.calibration_dtype == "float32" and opts.device == "cpu"
    for bad, words in (
        ({"drift": 1.5}, ["drift", "less than or equal to 1", "1.5"]),
        ({"calibration_tokens": 1}, ["calibration_tokens", "greater than or equal to 2"]),
        ({"stream": "sideways"}, ["stream", "'both', 'converted' or 'original'", "sideways"]),
        ({"calibration_dtype": "float64"}, ["calibration_dtype", "float32"]),
        ({"colour": "red"}, ["has no option(s) ['colour']", "it knows"]),
    ):
        with pytest.raises(ConversionError) as e:
            CalibratedOptions.parse(bad)
        assert all(w in str(e.value) for w in words), (bad, str(e.value))


def test_calibration_holds_no_layer_between_steps(tmp_path):
    """Layer by layer: after each layer's statistics and after its merge, every decoder layer of both skeletons is
    back on the meta device (only the calibration activations stay)."""
    from convert.pipeline.merge import convert_layer
    from convert.pipeline.source import open_source

    model = tiny_model("qwen2")
    src = open_source(save(model, tmp_path / "src"))
    method = get_method("calibrated")
    context = method.layer_contexts(src, 2, 0, **RANDOM, calibration_tokens=192)
    runner = context.runner

    def materialized() -> list[str]:
        return [
            n
            for sk in (runner.skeleton, runner.skeleton_new)
            for n, p in sk.named_parameters()
            if not p.is_meta and n.startswith(runner.layer_prefix)
        ]

    assert materialized() == []
    s_out = context.s_out
    for layer in range(src.shapes.num_layers):
        ctx = context(layer)
        assert materialized() == []
        keys = src.family.attention_keys(layer, set(src.tensors))
        convert_layer(src.family, method, layer, src.get, keys, src.shapes, s_out, 0, ctx)
        assert materialized() == []
    assert all(p.is_meta for p in runner.skeleton.get_input_embeddings().parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(tmp_path):
    from click.testing import CliRunner

    from convert.cli import main

    src = save(tiny_model("llama"), tmp_path / "src")
    args = ["convert", str(src), str(tmp_path / "out"), "-g", "2", "--method", "calibrated"]
    args += ["--calibration-data", "random", "--device", "cuda", "-q"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 2 and "no CUDA device is available here; use --device cpu" in run.output
    assert not (tmp_path / "out").exists()
    ok = CliRunner().invoke(main, [*args[:-3], "--device", "auto", "--calibration-tokens", "128", "-q"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "out" / "gqa_convert.json").read_text())["calibration"]["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_calibration_matches_cpu(tmp_path):
    """The same calibration on the GPU: exact merges stay exact, and the weights agree with the CPU run's."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny import logits, make_groups_identical

    model = tiny_model("llama")
    make_groups_identical(model, 2)
    src = save(model, tmp_path / "src")
    for device in ("cpu", "cuda"):
        opts = dict(RANDOM, calibration_tokens=384, device=device)
        convert_checkpoint(src, tmp_path / device, 2, "calibrated", progress=False, method_options=opts)
    cpu = AutoModelForCausalLM.from_pretrained(tmp_path / "cpu").eval()
    gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "cuda").eval()
    torch.testing.assert_close(logits(gpu), logits(model), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(gpu), logits(cpu), rtol=1e-4, atol=1e-4)
    prov = json.loads((tmp_path / "cuda" / "gqa_convert.json").read_text())
    assert prov["calibration"]["device"] == "cuda"


def test_calibration_text_is_sampled_as_the_data_module_samples(smollm2_path, tmp_path):
    """--calibration-data FILE reads the file the way every data option of the tool does (convert.text.sources)."""
    from transformers import AutoTokenizer

    from convert.methods.text import calibration_ids
    from convert.text.sources import sample_token_ids

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(400)))
    ids, where = calibration_ids(smollm2_path, str(text), 1024, 256, 3, 49152)
    expected = sample_token_ids(str(text), AutoTokenizer.from_pretrained(smollm2_path), 1024, 3)
    assert ids.shape == (4, 256) and torch.equal(ids, expected.reshape(4, 256))
    assert where.endswith("(seed 3)")
