"""The model side of a run: input folders checked, what trains chosen, the losses and the validation score."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from convert.errors import SettingsError
from convert.uptrain.seq2seq import model_class
from convert.uptrain.settings import Settings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(path: str, role: str, trust_remote_code: bool) -> None:
    """A checkpoint folder with config, weights (and, for the model, a tokenizer); remote code only when trusted."""
    folder = Path(path)
    if not folder.is_dir():
        raise SettingsError(f"{role} folder {path!r} does not exist")
    if not (folder / "config.json").is_file():
        raise SettingsError(
            f"{role} folder {path!r} has no config.json: point {role} at a checkpoint saved with save_pretrained "
            f"(e.g. the output of `gqa-convert convert`)"
        )
    if role == "model" and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise SettingsError(
            f"model folder {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the original "
            f"model's tokenizer there with AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({path!r})"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise SettingsError(f"{role} folder {path!r} has no weights (*.safetensors)")
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
    except (json.JSONDecodeError, AttributeError):
        raise SettingsError(f"{role} folder {path!r}: config.json is not a JSON object") from None
    if auto_map and not trust_remote_code:
        code = sorted({str(v).split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)})
        raise SettingsError(
            f"{role} folder {path!r} runs its own Python code (config.json auto_map: {', '.join(code) or auto_map}): "
            f"read that code, then set trust_remote_code=true to allow it"
        )


def use_fsdp_on_cpu(accelerator) -> None:
    """FSDP on CPU processes: accelerate turns an FSDP launch into plain gloo data parallelism when no GPU is
    present, yet FSDP2 shards over gloo as well; switch the state to FSDP so that CPU runs take the GPU path."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # read from the launcher's environment, as accelerate does
        if plugin.fsdp_version != 2:
            raise SettingsError("FSDP on CPU processes needs fsdp_version: 2 (see recipes/accelerate_fsdp_cpu.yaml)")
        # both shared states: accelerate re-reads the partial one into the full one on later calls
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin


def check_modules(s: Settings, skeleton: torch.nn.Module) -> None:
    """The named K/V and LoRA modules exist in the model (checked on a weightless skeleton)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules() if name}
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
    wanted = {"kv_modules": s.kv_modules} if s.train in ("kv", "attention", "lora") else {}
    if s.train == "lora":
        wanted["lora_modules"] = s.lora_modules
    for key, names in wanted.items():
        missing = [n for n in names if n not in present]
        if missing:
            raise SettingsError(
                f"{key} names modules that do not exist in {s.model}: {', '.join(missing)}; "
                f"its linear layers are: {', '.join(linear)}"
            )


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_lm(path: str, s: Settings) -> torch.nn.Module:
    """The model (or teacher) in the Auto class of the objective: causal LM, or seq-to-seq for span corruption."""

    return model_class(s).from_pretrained(
        path, dtype=getattr(torch, s.model_dtype), trust_remote_code=s.trust_remote_code
    )


def choose_trainable(model: torch.nn.Module, s: Settings) -> torch.nn.Module:
    """Freeze what the scope does not train; for LoRA, wrap with peft (K/V projections via modules_to_save)."""
    if s.train == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=s.lora_r,
            lora_alpha=s.lora_alpha,
            lora_dropout=s.lora_dropout,
            target_modules=list(s.lora_modules),
            modules_to_save=list(s.kv_modules),
            task_type="SEQ_2_SEQ_LM" if s.objective == "span_corruption" else "CAUSAL_LM",
        )
        return get_peft_model(model, config)
    if s.train == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in s.kv_modules:
            continue
        # kv: the K/V projections; attention: the whole module that holds them (q, k, v, o, ...)
        target = module if s.train == "kv" else model.get_submodule(name.rsplit(".", 1)[0])
        target.requires_grad_(True)
    return model


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a packed block (every position but the last predicts the next token)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction
    )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """T^2 x KL(teacher || student) on temperature-softened distributions, per token."""
    s = torch.log_softmax(student.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) * temperature**2  # [B, T]
    return kl.mean() if reduction == "mean" else kl.sum()


@torch.no_grad()
def evaluate(accelerator, model, teacher, blocks: torch.Tensor, batch_size: int, temperature: float, task) -> dict:
    """Validation loss (and KL to the teacher), each process scoring its share of the blocks (`task`: how a model
    scores rows, `convert.uptrain.seq2seq`)."""
    model.eval()
    mine = blocks[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nll, tokens, kl
    for i in range(0, len(mine), batch_size):
        ids = mine[i : i + batch_size].to(accelerator.device)
        logits = task.logits(model, ids)
        totals[0] += task.loss(logits, ids, "sum").double()
        totals[1] += task.count(ids)
        if teacher is not None:
            with accelerator.autocast():
                t_logits = task.logits(teacher, ids)
            totals[2] += kd_loss(task.scored(logits), task.scored(t_logits), temperature, "sum").double()
    totals = accelerator.reduce(totals, "sum")
    model.train()
    out = {"val_loss": (totals[0] / totals[1]).item()}
    out["val_ppl"] = math.exp(min(out["val_loss"], 700))
    if teacher is not None:
        out["val_kl"] = (totals[2] / totals[1]).item()
    return out
