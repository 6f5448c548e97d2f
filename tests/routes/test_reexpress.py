"""Classic MHA families converted through a stock class (convert.routes.reexpress): tiny gpt_neox (both residual forms),
gptj, gpt2 and opt models built from configs, saved as real safetensors, converted, loaded with `from_pretrained`
as phi, nemotron or gpt_bigcode, and compared with the source's own forward pass."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from convert import convert_checkpoint, describe
from convert.cli import main
from convert.errors import ConversionError

REPO = Path(__file__).resolve().parents[2]
V = 160  # vocabulary of the tiny models
# route -> (source model_type, config, output model_type, G values the output class can hold below H)
SOURCES: dict[str, tuple[str, dict, str, tuple[int, ...]]] = {
    "neox-parallel": (
        "gpt_neox",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            use_parallel_residual=True,
            rotary_pct=0.5,  # partial rotary, as in every Pythia model
        ),
        "phi",
        (2, 1),
    ),
    "neox-sequential": (
        "gpt_neox",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            use_parallel_residual=False,
            rotary_pct=0.5,
        ),
        "nemotron",
        (2, 1),
    ),
    "gptj": ("gptj", dict(n_embd=64, n_layer=2, n_head=8, n_inner=96, rotary_dim=4), "phi", (2, 1)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=8, n_inner=96), "gpt_bigcode", (1,)),
    "opt": (
        "opt",
        dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=8, word_embed_proj_dim=64),
        "gpt_bigcode",
        (1,),
    ),
}
ROUTES = list(SOURCES)
H = 8


def source_model(route: str, seed: int = 0, **overrides) -> torch.nn.Module:
    model_type, kwargs, _, _ = SOURCES[route]
    sizes = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    sizes["n_positions" if model_type in ("gpt2", "gptj") else "max_position_embeddings"] = 64
    config = AutoConfig.for_model(model_type, **{**sizes, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: move them so every fold is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _same_in_groups(x: torch.Tensor, head_axis: int, groups: int) -> None:
    """In place: every head along `head_axis` becomes the first head of its contiguous group."""
    n = x.shape[head_axis] // groups
    heads = x.movedim(head_axis, 0)
    for h in range(heads.shape[0]):
        heads[h].copy_(heads[h - h % n])


def make_kv_groups_identical(model: torch.nn.Module, route: str, groups: int) -> None:
    """Identical K/V heads inside each contiguous group, written in the source's own layout."""
    c, d = model.config, 64 // H
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
                rows = p.view(H, 3, d, -1)  # NeoX: [q, k, v] per head
                for part in (1, 2):
                    _same_in_groups(rows[:, part], 0, groups)
            elif name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
                _same_in_groups(p.view(H, d, -1), 0, groups)
            elif name.endswith("attn.c_attn.weight"):  # GPT-2 Conv1D: columns [q | k | v] heads
                cols = p.view(c.n_embd, 3, H, d)
                for part in (1, 2):
                    _same_in_groups(cols[:, part], 1, groups)
            elif name.endswith("attn.c_attn.bias"):
                for part in (1, 2):
                    _same_in_groups(p.view(3, H, d)[part], 0, groups)


def tokens(seed: int = 1, length: int = 20) -> torch.Tensor:
    return torch.randint(3, V, (2, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens() if ids is None else ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def convert(route: str, tmp_path: Path, groups: int, model=None, **kwargs):
    model = model if model is not None else source_model(route)
    src = tmp_path / "src"
    if not src.exists():
        model.save_pretrained(src, max_shard_size="100KB")
    out = tmp_path / f"out-g{groups}"
    report = convert_checkpoint(src, out, groups, progress=False, **kwargs)
    return model, AutoModelForCausalLM.from_pretrained(out).eval(), report, out


@pytest.mark.parametrize("route", ROUTES)
def test_re_expression_alone_gives_the_source_logits(route, tmp_path):
    model, out, report, folder = convert(route, tmp_path, H)
    assert out.config.model_type == SOURCES[route][2] == report.output_model_type
    assert report.model_type == SOURCES[route][0] and report.route != "as is"
    assert rel_err(logits_of(out), logits_of(model)) <= 1e-4
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 1, "the source should be sharded"


@pytest.mark.parametrize("route", ROUTES)
def test_identical_kv_heads_in_groups_give_the_source_logits(route, tmp_path):
    for groups in SOURCES[route][3]:
        model = source_model(route)
        make_kv_groups_identical(model, route, groups)
        _, out, report, folder = convert(route, tmp_path / str(groups), groups, model=model)
        assert rel_err(logits_of(out), logits_of(model)) <= 1e-4, groups
        assert all(r["k_rel_err"] < 1e-5 and r["v_rel_err"] < 1e-5 for r in report.per_layer)
        # ... and distinct heads do change the function: the test above means something.
        distinct = source_model(route)
        _, merged, _, _ = convert(route, tmp_path / f"distinct-{groups}", groups, model=distinct)
        assert rel_err(logits_of(merged), logits_of(distinct)) > 1e-3


@pytest.mark.parametrize("route", ROUTES)
def test_cache_holds_g_heads_and_generate_equals_recomputation(route, tmp_path):
    groups = SOURCES[route][3][0]
    _, out, _, folder = convert(route, tmp_path, groups)
    prompt = tokens(length=5)[:1]
    with torch.no_grad():
        step = out(input_ids=prompt, use_cache=True)
    cache = getattr(step, "past_key_values", None) or step.cache
    keys = cache.layers[0].keys
    assert keys.shape[:3] == (1, groups, 5), keys.shape  # [batch, G KV heads, tokens, head_dim]
    generated = out.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(6):  # no cache: every step recomputes the whole prefix
        with torch.no_grad():
            nxt = out(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("route", ROUTES)
def test_sdpa_and_eager_agree(route, tmp_path):
    groups = SOURCES[route][3][0]
    _, _, _, folder = convert(route, tmp_path, groups)
    eager = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert_close(logits_of(sdpa), logits_of(eager), rtol=1e-4, atol=1e-5)


def test_every_source_tensor_is_kept_and_the_head_named_as_the_target_expects(tmp_path):
    """NeoX stores its untied head as `embed_out.weight`: written as phi's `lm_head.weight` (else phi would load a
    random head), with the zero `lm_head.bias` phi expects; GPT-2's tied head stays tied."""
    from safetensors import safe_open

    _, out, _, folder = convert("neox-parallel", tmp_path / "neox", H)
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names = set(st.keys())
            keys |= names
            if "lm_head.bias" in names:
                assert not st.get_tensor("lm_head.bias").any()
    assert {"lm_head.weight", "lm_head.bias"} <= keys and not any("embed_out" in k for k in keys)
    model, out, _, folder = convert("gpt2", tmp_path / "gpt2", H)
    assert out.config.tie_word_embeddings and out.lm_head.weight.data_ptr() == out.transformer.wte.weight.data_ptr()
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True


def test_tied_neox_stays_tied(tmp_path):
    model = source_model("neox-parallel", tie_word_embeddings=True)
    _, out, _, folder = convert("neox-parallel", tmp_path, H, model=model)
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()
    assert rel_err(logits_of(out), logits_of(model)) <= 1e-4


@pytest.mark.parametrize(
    ("route", "overrides"),
    [
        ("neox-parallel", {"attention_bias": False}),  # phi's q/k/v biases are W beta alone, dense's zero
        ("neox-sequential", {"attention_bias": False}),  # nemotron without attention biases
        ("gptj", {"rotary_dim": 8}),  # rotary over the whole head (head_dim 8)
        ("opt", {"enable_bias": False, "layer_norm_elementwise_affine": False}),  # zeros and ones written
    ],
)
def test_config_variants_re_express_exactly(route, overrides, tmp_path):
    model = source_model(route, **overrides)
    _, out, _, _ = convert(route, tmp_path, H, model=model)
    assert rel_err(logits_of(out), logits_of(model)) <= 1e-4


def test_hub_style_gpt2_keys_and_mask_buffers(tmp_path):
    """The hub's gpt2 files name keys without `transformer.` and carry causal-mask buffers: the prefix is added,
    the buffers are not written, and the report says so."""
    from safetensors.torch import load_file, save_file

    model = source_model("gpt2")
    src = tmp_path / "src"
    model.save_pretrained(src)
    state = load_file(src / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _, out, report, _ = convert("gpt2", tmp_path, H, model=model)
    assert rel_err(logits_of(out), logits_of(model)) <= 1e-4
    assert any("2 buffer tensor(s) not written" in n for n in report.notes)


def test_unknown_tensors_are_refused_not_dropped(tmp_path):
    from safetensors.torch import load_file, save_file

    model = source_model("gptj")
    src = tmp_path / "src"
    model.save_pretrained(src)
    state = load_file(src / "model.safetensors")
    state["transformer.h.0.attn.extra_adapter.weight"] = torch.zeros(2, 2)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="does not know .*extra_adapter.*refusing rather than dropping"):
        convert_checkpoint(src, tmp_path / "out", 1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("route", "overrides", "groups"),
    [("gpt2", {}, 2), ("opt", {}, 4), ("opt", {"do_layer_norm_before": False}, 1)],  # the last: opt-350m's layout
)
def test_layouts_without_a_stock_class_take_the_shipped_code_route(route, overrides, groups, tmp_path):
    """gpt_bigcode holds H KV heads or one; 1 < G < H (and post-LN opt at any G < H) is the shipped-code route,
    refused without its flag."""
    src = tmp_path / "src"
    source_model(route, **overrides).save_pretrained(src)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "-g", str(groups)])
    assert result.exit_code == 2, result.output
    assert "--write-modeling-code" in result.output
    assert not (tmp_path / "out").exists()
    flagged = CliRunner().invoke(
        main, ["convert", str(src), str(tmp_path / "out"), "-g", str(groups), "--write-modeling-code", "--json"]
    )
    assert flagged.exit_code == 0, flagged.output
    report = json.loads(flagged.output[flagged.output.index("{") :])
    assert report["route"] == "shipped code" and report["output_model_type"] == f"gqa_{route}"


def test_report_inspect_dry_run_card_and_provenance_say_the_route(tmp_path):
    model = source_model("neox-parallel")
    model.save_pretrained(tmp_path / "src")
    info = describe(tmp_path / "src")
    assert (info["model_type"], info["output_model_type"], info["route"]) == ("gpt_neox", "phi", "gpt_neox -> phi")
    assert info["num_kv_heads"] == H and info["rotary_dim"] == 4
    assert list(info["valid_num_kv_heads"]) == [1, 2, 4, 8]
    source_model("gpt2").save_pretrained(tmp_path / "gpt2")
    gpt2 = describe(tmp_path / "gpt2")
    assert gpt2["route"] == "gpt2 -> gpt_bigcode" and gpt2["rotary_dim"] == 0  # learned positions
    assert list(gpt2["valid_num_kv_heads"]) == [1, 2, 4, 8]  # gpt_bigcode holds 1 and 8; shipped code 2 and 4
    assert list(gpt2["shipped_code"]) == [2, 4]
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(tmp_path / "src")])
    assert shown.exit_code == 0 and "route: gpt_neox -> phi: written as phi" in shown.output
    dry = runner.invoke(main, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-g", "2", "--dry-run"])
    assert dry.exit_code == 0 and "route: gpt_neox -> phi (output model_type phi)" in dry.output, dry.output
    assert not (tmp_path / "out").exists()
    done = runner.invoke(main, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-g", "2", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output[done.output.index("{") :])
    assert report["route"] == "gpt_neox -> phi" and report["output_model_type"] == "phi"
    assert report["bytes_in"] == sum(f.stat().st_size for f in (tmp_path / "src").glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in (tmp_path / "src").glob("*.safetensors")
    )  # the source's tensor bytes, not the view's
    prov = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())
    assert prov["route"] == "gpt_neox -> phi" and "from_pretrained" in prov["load_with"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "re-expressed as `phi` (route `gpt_neox -> phi`)" in card
    # The source is only read.
    assert json.loads((tmp_path / "src" / "config.json").read_text())["model_type"] == "gpt_neox"


@pytest.mark.parametrize("method", ["first", "random"])
def test_every_weight_only_method_runs_on_a_route(method, tmp_path):
    model = source_model("gptj")
    make_kv_groups_identical(model, "gptj", 2)
    _, out, report, _ = convert("gptj", tmp_path, 2, model=model, method=method)
    assert out.config.num_key_value_heads == 2 and report.method == method
    if method == "first":  # identical heads: the first of each group is the group
        assert rel_err(logits_of(out), logits_of(model)) <= 1e-4


@pytest.mark.slow
def test_calibrated_runs_the_target_class(tmp_path):
    model = source_model("neox-parallel")
    make_kv_groups_identical(model, "neox-parallel", 2)
    options = dict(calibration_data="random", calibration_tokens=384, calibration_seq_len=48)
    _, out, report, _ = convert("neox-parallel", tmp_path, 2, model=model, method="calibrated", method_options=options)
    assert out.config.model_type == "phi" and out.config.num_key_value_heads == 2
    assert rel_err(logits_of(out), logits_of(model)) <= 1e-3


def test_hub_id_offline_through_a_route(tmp_path, monkeypatch):
    from tests.helpers.hub import fake_hub_cache

    model = source_model("neox-parallel")
    model.save_pretrained(tmp_path / "src")
    cache = tmp_path / "home" / "hub"
    fake_hub_cache(cache, "tiny-org/tiny-pythia", tmp_path / "src")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    result = CliRunner().invoke(main, ["convert", "tiny-org/tiny-pythia", str(tmp_path / "out"), "-g", "1", "-q"])
    assert result.exit_code == 0, result.output
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert out.config.model_type == "phi" and out.config.num_key_value_heads == 1
    assert "base_model: tiny-org/tiny-pythia" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.slow
def test_uptraining_a_converted_output(tmp_path):
    """Two steps of recipes/uptrain.py on a Pythia-layout model converted to MQA through phi."""
    from tests.helpers.uptrain import toy_documents, train_tokenizer, write_corpus

    docs = toy_documents(60)
    tok = train_tokenizer(docs)
    model = source_model("neox-parallel", vocab_size=len(tok))
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    convert_checkpoint(src, tmp_path / "mqa", 1, progress=False)
    corpus = write_corpus(tmp_path / "corpus.txt", docs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    args = [f"model={tmp_path / 'mqa'}", f"data={corpus}", f"output_dir={tmp_path / 'run'}", "max_steps=2"]
    args += ["block_size=32", "micro_batch_size=2", "grad_accum=1", "max_eval_blocks=2", "report_to=none"]
    args += ["pretraining_tokens=100000", "--json"]
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "uptrain.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["steps"] == 2
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert trained.config.model_type == "phi" and trained.config.num_key_value_heads == 1


def test_in_memory_conversion_points_to_the_checkpoint_route():
    from convert import convert_model

    with pytest.raises(ConversionError, match="gpt_neox's transformers class has no KV-head count.*checkpoint"):
        convert_model(source_model("neox-parallel"), 1)


def test_the_view_reads_nothing_and_renamed_tensors_are_copied_raw(tmp_path, monkeypatch):
    """Opening and planning a route reads no tensor data; renamed tensors pass through as the source's bytes,
    derived ones are computed when written (one at a time)."""
    from safetensors.torch import load_file

    from convert.io import safetensors as tensorio
    from convert.pipeline.planning import plan_tensors
    from convert.pipeline.source import open_source

    model = source_model("gptj")
    model.save_pretrained(tmp_path / "src")
    reads: list = []
    real = tensorio.read_into
    monkeypatch.setattr(tensorio, "read_into", lambda info, buf: (reads.append(info), real(info, buf)))
    src = open_source(tmp_path / "src")
    plan, _ = plan_tensors(src, 2, "keep")
    assert reads == []
    by_name = {t.name: t for t in plan}
    assert by_name["model.layers.0.mlp.fc1.weight"].verbatim  # a rename: copied byte for byte
    assert src.tensors["model.layers.0.self_attn.q_proj.weight"].derive is not None  # rotary rows permuted
    convert_checkpoint(tmp_path / "src", tmp_path / "out", 2, progress=False)
    before, after = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(after["model.layers.1.mlp.fc1.weight"], before["transformer.h.1.mlp.fc_in.weight"])
    assert not after["model.layers.1.self_attn.q_proj.bias"].any()  # GPT-J has no q bias: zeros


def test_bfloat16_source_stays_bfloat16_and_renames_keep_their_bytes(tmp_path):
    from safetensors.torch import load_file

    model = source_model("neox-parallel").to(torch.bfloat16)
    _, out, _, folder = convert("neox-parallel", tmp_path, 2, model=model)
    written = {}
    for f in folder.glob("*.safetensors"):
        written.update(load_file(f))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    source = {}
    for f in (tmp_path / "src").glob("*.safetensors"):
        source.update(load_file(f))
    assert torch.equal(written["lm_head.weight"], source["embed_out.weight"])
    # Folded projections are computed in float32 from the bfloat16 weights and rounded once.
    w, gamma = (
        source["gpt_neox.layers.0.attention.query_key_value.weight"],
        source["gpt_neox.layers.0.input_layernorm.weight"],
    )
    q = (w.float().view(H, 3, 8, 64)[:, 0].reshape(64, 64) * gamma.float()).to(torch.bfloat16)
    assert torch.equal(written["model.layers.0.self_attn.q_proj.weight"], q)


def _big_neox(folder: Path, layers: int) -> Path:
    """A gpt_neox checkpoint of `layers` layers of 48 MB each (float32), written shard by shard without a model."""
    from safetensors.torch import save_file

    config = AutoConfig.for_model(
        "gpt_neox", hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16
    )
    config.vocab_size = 4096
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shapes["embed_out.weight"] = shapes.pop("lm_head.weight")  # the name NeoX files use
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}  # one shard per layer, one for the rest
    for key in shapes:
        groups.setdefault(re.sub(r"^.*\.layers\.(\d+)\..*$", r"layer\1", key), []).append(key)
    weight_map = {}
    for i, keys in enumerate(groups.values()):
        name = f"model-{i:05d}.safetensors"
        save_file({k: torch.randn(shapes[k], generator=gen) * 0.02 for k in keys}, folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    """Derived tensors are computed one at a time: converting 12 layers through the phi route peaks no higher
    than 2 layers (plus noise), while the checkpoint is 480 MB larger."""
    peaks = {}
    for layers in (2, 12):
        src = _big_neox(tmp_path / f"src{layers}", layers)
        code = (
            "import resource, sys\n"
            "from convert import convert_checkpoint\n"
            f"convert_checkpoint({str(src)!r}, {str(tmp_path / f'out{layers}')!r}, 1, progress=False)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[layers] = int(result.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux
        shutil.rmtree(src)
    assert peaks[12] - peaks[2] < 64 << 20, peaks


def test_hub_style_opt_keys_and_an_untied_looking_head(tmp_path):
    """Some OPT files name keys `decoder.` without `model.` and also store the tied head: both convert, and the
    head stays tied to the embedding."""
    from safetensors.torch import load_file, save_file

    model = source_model("opt")
    src = tmp_path / "src"
    model.save_pretrained(src)
    state = load_file(src / "model.safetensors")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    state["lm_head.weight"] = state["decoder.embed_tokens.weight"].clone()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _, out, report, _ = convert("opt", tmp_path, H, model=model)  # reads the edited file in src
    assert report.route == "opt -> gpt_bigcode"
    assert rel_err(logits_of(out), logits_of(model)) <= 1e-4
    assert out.lm_head.weight.data_ptr() == out.transformer.wte.weight.data_ptr()
