"""The run folder: resumable checkpoints (written whole or not at all) and the final model.

    output_dir/checkpoints/step-000100/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    output_dir/model/                     safetensors + tokenizer + model card + training_summary.json
Both are written to a `.tmp-*` folder first and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from convert.errors import SettingsError, WriteError
from convert.uptrain.seq2seq import model_class
from convert.uptrain.settings import RUN_KEYS, Settings
from convert.uptrain.summary import model_card, plot_losses

CHECKPOINT_PREFIX = "step-"


def checkpoint_dir(s: Settings) -> Path:
    return Path(s.output_dir) / "checkpoints"


def complete_checkpoints(s: Settings) -> list[Path]:
    """Finished checkpoints, oldest first (a folder is renamed into place only once complete)."""
    root = checkpoint_dir(s)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def fingerprint(s: Settings, plan: dict) -> dict:
    """What decides a run's trajectory: a checkpoint resumes only under the same values."""
    run = {k: getattr(s, k) for k in RUN_KEYS}
    run.update({k: plan[k] for k in ("global_batch", "total_steps", "warmup_steps")})
    return run


def differences(saved: dict, current: dict) -> list[str]:
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in current if saved.get(k) != current.get(k)]


def find_resume_point(s: Settings, run: dict) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; refuses another run's checkpoints."""
    checkpoints = complete_checkpoints(s)
    if s.resume not in ("never", "auto"):
        chosen = Path(s.resume)
        if not (chosen / "trainer_state.json").is_file():
            raise SettingsError(f"resume folder {s.resume!r} is not a complete checkpoint (no trainer_state.json)")
        candidates = [chosen]
    elif s.resume == "never":
        if checkpoints:
            raise SettingsError(
                f"output_dir {s.output_dir!r} holds another run's checkpoints ({checkpoints[-1].name}, ...): "
                f"set resume: auto to continue that run, or choose a new output_dir"
            )
        if (Path(s.output_dir) / "model").exists():
            raise SettingsError(f"output_dir {s.output_dir!r} already holds a finished run's model/: choose a new one")
        return None
    else:
        candidates = checkpoints[-1:]
    if not candidates:
        return None
    saved = json.loads((candidates[-1] / "trainer_state.json").read_text())["run"]
    changed = differences(saved, run)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise SettingsError(
            f"{candidates[-1]} holds a checkpoint of another run (settings differ: {shown}): "
            f"restore those settings to resume it, or choose a new output_dir"
        )
    return candidates[-1]


def clear_partial_checkpoints(s: Settings) -> None:
    """Drop what a killed run was writing or deleting: checkpoints, model, metrics, the plot (main process)."""
    for leftover in [*checkpoint_dir(s).glob(".tmp-*"), *Path(s.output_dir).glob(".tmp-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def discard(folder: Path) -> None:
    """Delete a folder by renaming it to `.tmp-` first: a kill inside the delete leaves debris that no reader
    takes for a checkpoint or a model (runs clear `.tmp-` folders), never a half folder under its real name."""
    if folder.exists():
        trash = folder.with_name(f".tmp-discard-{folder.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash)


@contextlib.contextmanager
def writing(what: str, s: Settings, *temporary: Path):
    """Turn a failed write into a WriteError that says what to do, after removing the half-written `temporary`."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a short write as a RuntimeError
        for path in temporary:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        keep = complete_checkpoints(s)
        raise WriteError(
            f"cannot write {what} in {s.output_dir}: {e}. Nothing half-written was left under a final name; the "
            f"newest complete checkpoint is {keep[-1].name if keep else 'none'}. Free space (or lift the file-size "
            f"limit), then rerun with resume: auto"
        ) from None


def save_checkpoint(accelerator, s: Settings, step: int, trainer_state: dict, stream) -> Path:
    """`save_state` into a temporary folder, renamed into place when complete; keep the newest K."""
    root = checkpoint_dir(s)
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step:06d}", root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(f"checkpoint {final.name}", s, tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(f"checkpoint {final.name}", s, tmp):
            if stream is not None:  # the position in a streamed corpus (the same on every process)
                (tmp / "stream_state.json").write_text(json.dumps(stream.state()))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        discard(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(s)[: -s.keep_checkpoints]:
            discard(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict | None]:
    """Restore model, optimizer, scheduler and RNG; the trainer state and the stream position, if any."""
    accelerator.load_state(str(path))
    stream = path / "stream_state.json"
    return json.loads((path / "trainer_state.json").read_text()), (
        json.loads(stream.read_text()) if stream.is_file() else None
    )


def save_output(accelerator, model, s: Settings, tokenizer, summary: dict, rows: list[dict]) -> Path:
    """The final model as a plain checkpoint in output_dir/model, written to a temporary folder first."""
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    out = Path(s.output_dir)
    final, tmp = out / "model", out / ".tmp-model"
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the shards)
    if accelerator.is_main_process:
        result = accelerator.unwrap_model(model)
        config = AutoConfig.from_pretrained(s.model, trust_remote_code=s.trust_remote_code)
        if accelerator.distributed_type == DistributedType.FSDP:  # the wrapped weights are shards: rebuild
            result = model_class(s).from_config(
                config, dtype=getattr(torch, s.model_dtype), trust_remote_code=s.trust_remote_code
            )
            result.load_state_dict(state)
        if s.train == "lora":
            result = result.merge_and_unload()  # LoRA folded into the weights: a plain checkpoint
        result.requires_grad_(False)
        save_dtype = s.save_dtype or str(config.dtype or s.model_dtype).replace("torch.", "")  # the input's dtype
        result = result.to(getattr(torch, save_dtype))
        result.config.use_cache = True
        shutil.rmtree(tmp, ignore_errors=True)
        with writing("the final model", s, tmp, out / ".tmp-loss.png"):
            result.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for extra in Path(s.model).iterdir():  # what else the input carried (conversion report, licence, ...)
                weights = extra.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))
                if extra.is_file() and not weights and not (tmp / extra.name).exists() and extra.name != "README.md":
                    shutil.copy2(extra, tmp / extra.name)
            (tmp / "README.md").write_text(model_card(s.model, summary))
            (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2))
            plot_losses(rows, out / ".tmp-loss.png")
        os.replace(out / ".tmp-loss.png", out / "loss.png")
        discard(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
