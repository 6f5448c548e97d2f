"""The training loop, in the order it runs: check, setup, train step, evaluate, save, finish.

`uptrain(settings)` runs one budgeted continued-pretraining run on however many processes `accelerate launch`
started (one CPU, one GPU, DDP or FSDP over nodes) and returns its training summary. Everything is checked before
any compute; a checkpoint restores model, optimizer, scheduler, RNG and the data position, so a resumed run
reproduces the uninterrupted one step for step.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from convert.errors import DataError, PublishError, SettingsError, TrainingError
from convert.formatting import duration
from convert.uptrain import checkpointing as ckpt
from convert.uptrain import mixture, publishing
from convert.uptrain.batches import prepare_data, step_batches, stream_batches
from convert.uptrain.budget import lr_factor, plan_budget
from convert.uptrain.loader import make_loader
from convert.uptrain.memory import checkpoint_bytes, device_peak_tflops, estimate_memory, mfu, peak_memory, rss_now
from convert.uptrain.model import (
    check_model_folder,
    check_modules,
    choose_trainable,
    count_params,
    evaluate,
    kd_loss,
    load_lm,
    use_fsdp_on_cpu,
)
from convert.uptrain.seq2seq import check_objective, make_task, model_class
from convert.uptrain.settings import OPTIONAL_RUN_KEYS, SPAN_KEYS, STREAM_KEYS, Options, Settings, load_settings
from convert.uptrain.sharding import describe_wrap, fsdp_launch, merge_shared_embeddings, set_wrap, wrap_classes
from convert.uptrain.speed import check_optimizer, choose_attention, make_optimizer, optimizer_name
from convert.uptrain.summary import Metrics, Summary, describe_memory, describe_plan


@dataclass
class Hooks:
    """Test-only switches into the loop; the defaults change nothing."""

    on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # (step, loss) -> the loss to backpropagate
    after_step: Callable[[int], None] | None = None  # called after each optimizer step, before it is logged


def world_size() -> int:
    """The number of processes `accelerate launch` (or torchrun, MPI) started, read before any setup."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def process_rank() -> int:
    """This process's index among `world_size()`, read before any setup (the data is prepared before it)."""
    return int(os.environ.get("RANK", "0"))


class Uptraining:
    """One run: `check()` (no compute), `setup()`, then `train()`, which calls `train_step`, `evaluate`, `save`."""

    def __init__(self, s: Settings, options: Options | None = None, hooks: Hooks | None = None):
        self.s, self.options, self.hooks = s, options or Options(), hooks or Hooks()
        self.chatter = sys.stderr if self.options.json else sys.stdout
        self.token: str | None = None  # the hub token push_to_hub uses, checked in `check`

    def publish(self, summary: Summary) -> Summary:
        """push_to_hub: upload model/ of the complete run (main process; convert/uptrain/publishing.py)."""
        return publishing.publish(self.s, self.token, summary, self.say, is_main_rank())

    def say(self, text: str) -> None:
        """Main process only; tqdm.write keeps the progress bar intact."""
        from tqdm.auto import tqdm

        if is_main_rank() and not self.options.quiet:
            tqdm.write(text, file=self.chatter)
            self.chatter.flush()

    # ------------------------------------------------------------------ 1. check everything before compute
    def check(self) -> Summary | None:
        """Inputs, budget, resume point and data; the finished summary when this very run is already complete."""
        from transformers import AutoConfig, AutoTokenizer

        s, trust = self.s, self.s.trust_remote_code
        if s.push_to_hub:  # a missing or rejected hub token must not cost a training run
            self.token = publishing.check(s)
        check_model_folder(s.model, "model", trust)
        if s.teacher is not None:
            check_model_folder(s.teacher, "teacher", trust)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(s.model, trust_remote_code=trust)
            config = AutoConfig.from_pretrained(s.model, trust_remote_code=trust)
        except Exception as e:
            raise SettingsError(f"cannot read the tokenizer or config in {s.model!r}: {e}") from None
        check_objective(s, config, "model", s.model)
        self.task = make_task(s, config)
        check_optimizer(s)

        def skeleton_of(model_config, impl: str) -> torch.nn.Module:
            with torch.device("meta"):
                return model_class(s).from_config(model_config, trust_remote_code=trust, attn_implementation=impl)

        self.attn = choose_attention(s, lambda impl: skeleton_of(config, impl))
        skeleton = skeleton_of(config, self.attn)
        check_modules(s, skeleton)
        self.total_params, self.teacher_params, teacher_vocab = count_params(skeleton), 0, 0
        self.planned_trainable = count_params(choose_trainable(skeleton, s), trainable_only=True)
        self.wrap = self.teacher_wrap = None  # the block classes FSDP shards as units
        if fsdp_launch() or s.fsdp_wrap:
            self.wrap = wrap_classes(skeleton, s.fsdp_wrap)
            self.wrap_text = describe_wrap(skeleton, self.wrap)
        del skeleton
        if s.teacher is not None:
            teacher_config = AutoConfig.from_pretrained(s.teacher, trust_remote_code=trust)
            check_objective(s, teacher_config, "teacher", s.teacher)
            if teacher_config.vocab_size != config.vocab_size:
                raise SettingsError(
                    f"teacher vocabulary ({teacher_config.vocab_size}) differs from the model's "
                    f"({config.vocab_size}): the teacher must be the original of the converted model"
                )
            self.teacher_attn = choose_attention(s, lambda impl: skeleton_of(teacher_config, impl), "teacher")
            teacher = skeleton_of(teacher_config, self.teacher_attn)
            self.teacher_params, teacher_vocab = count_params(teacher), teacher_config.vocab_size
            if fsdp_launch():  # its own blocks: the original's class is not the converted one's (gpt_neox, phi)
                self.teacher_wrap = wrap_classes(teacher, None, "teacher", launcher=False)
        self.plan = plan_budget(s, world_size())
        tokens = self.plan["tokens"]
        self.plan["alpha"] = tokens / s.pretraining_tokens if s.pretraining_tokens else None
        self.plan["flops_per_token"] = 6 * self.total_params + 2 * self.teacher_params
        self.plan["flops"] = self.plan["flops_per_token"] * tokens
        self.run_id = ckpt.fingerprint(s, self.plan)
        if s.objective != "causal_lm":  # causal runs keep the fingerprint their checkpoints already hold
            self.run_id.update({k: getattr(s, k) for k in SPAN_KEYS})
        self.run_id.update({k: getattr(s, k) for k, default in OPTIONAL_RUN_KEYS.items() if getattr(s, k) != default})
        if s.streaming:  # a stream is split per worker: its batches depend on num_workers
            self.run_id.update({k: getattr(s, k) for k in STREAM_KEYS})
        self.resume_from = ckpt.find_resume_point(s, self.run_id)
        done = Path(s.output_dir) / "model" / "training_summary.json"
        if s.resume == "auto" and done.is_file() and json.loads(done.read_text()).get("run") == self.run_id:
            self.say(f"{s.output_dir}: this run is already complete (model/ written); nothing to do")
            return self.publish(json.loads(done.read_text()))
        self.data = prepare_data(s, self.tokenizer, process_rank(), world_size())
        val = self.data["val_blocks"]
        if val is not None and len(val) < self.plan["num_processes"]:
            raise SettingsError(
                f"{len(val)} validation blocks cannot be shared by {self.plan['num_processes']} processes: "
                f"raise max_eval_blocks or the validation data"
            )
        on_gpu = torch.accelerator.is_available()
        self.memory = estimate_memory(
            config,
            total_params=self.total_params,
            trainable_params=self.planned_trainable,
            teacher_params=self.teacher_params,
            teacher_vocab=teacher_vocab,
            model_dtype=s.model_dtype,
            mixed_precision=s.mixed_precision,
            micro_batch_size=s.micro_batch_size,
            row_tokens=s.block_tokens,
            processes=self.plan["num_processes"],
            sharded=fsdp_launch(),
            gradient_checkpointing=s.gradient_checkpointing,
            optimizer_bytes_per_param=2 if s.optimizer == "adamw_8bit" else 8,
            baseline=0 if on_gpu else rss_now(),  # CUDA counts allocations; CPU the whole process
            checkpoint_bytes=checkpoint_bytes(s.model),
            teacher_checkpoint_bytes=checkpoint_bytes(s.teacher) if s.teacher else 0,
            on_cpu=not on_gpu,
        )
        return None

    # ------------------------------------------------------------------ 2. accelerate, model, optimizer, state
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, is_tensorboard_available, set_seed

        s, plan = self.s, self.plan
        if s.report_to == "none":
            trackers = []
        elif s.report_to == "auto":
            trackers = ["tensorboard"] if is_tensorboard_available() else []
        else:
            trackers = s.report_to.split(",")
        self.accelerator = accel = Accelerator(
            cpu=not torch.accelerator.is_available(),
            mixed_precision=s.mixed_precision,
            gradient_accumulation_steps=s.grad_accum,
            step_scheduler_with_optimizer=False,  # the schedule is per optimizer step, whatever the process count
            log_with=trackers or None,
            project_dir=str(Path(s.output_dir) / "logs"),
            dynamo_backend="inductor" if s.torch_compile else None,
        )
        assert accel.num_processes == plan["num_processes"], "WORLD_SIZE and accelerate disagree"
        use_fsdp_on_cpu(accel)
        set_seed(s.seed)
        if accel.is_main_process:
            Path(s.output_dir).mkdir(parents=True, exist_ok=True)
            ckpt.clear_partial_checkpoints(s)
        accel.wait_for_everyone()

        model = load_lm(s.model, s, self.attn)
        model.config.use_cache = False
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = choose_trainable(model, s)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in trainable)
        groups = [  # no weight decay on norms and biases
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": s.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = make_optimizer(s, groups, accel.device)
        total, warmup = plan["total_steps"], plan["warmup_steps"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total, s.min_lr_ratio)
        )
        if accel.distributed_type == DistributedType.FSDP:
            merge_shared_embeddings(model)
            set_wrap(accel, self.wrap)
        self.model, self.optimizer, self.scheduler = accel.prepare(model, optimizer, scheduler)

        self.teacher = None
        if s.teacher is not None:
            teacher = load_lm(s.teacher, s, self.teacher_attn)
            teacher.requires_grad_(False)
            teacher.eval()
            if accel.distributed_type == DistributedType.FSDP:
                merge_shared_embeddings(teacher)
                set_wrap(accel, self.teacher_wrap)
                teacher = accel.prepare_model(teacher, evaluation_mode=True)  # sharded like the student
            else:
                teacher = teacher.to(accel.device)
            self.teacher = teacher

        self.start_step, self.previous_seconds, stream_states = 0, 0.0, None
        if self.resume_from is not None:
            saved, stream_states = ckpt.load_checkpoint(accel, self.resume_from, s.streaming)
            self.start_step, self.previous_seconds = saved["step"], saved["train_seconds"]
        rank, procs = accel.process_index, accel.num_processes
        if s.streaming:
            self.dataset = stream_batches(s, self.data, rank, procs, self.start_step, stream_states)
            self.stream_states = dict(stream_states or {})  # part -> the state after its last batch trained on
        else:
            self.dataset, self.stream_states = step_batches(s, self.data, rank, procs), None
        resumed = self.start_step if self.resume_from is not None else None
        self.metrics = Metrics(accel, Path(s.output_dir) / "metrics.jsonl", resumed)
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in s.model_dump().items()}
        accel.init_trackers("uptrain", config=hparams)
        val = self.data["val_blocks"]  # an equal share for every process
        self.val_blocks = None if val is None else val[: len(val) - len(val) % plan["num_processes"]]
        self.last_checkpoint = self.resume_from.name if self.resume_from else None

        sizes = {"trainable": self.trainable_params, "total": self.total_params}
        resume = (str(self.resume_from), self.start_step) if self.resume_from is not None else None
        self.data.update(source_report=self.source_report(), num_workers=s.num_workers)
        for line in describe_plan(s, plan, self.data, sizes, resume):
            self.say(line)
        self.say(
            f"  kernels     attention {self.attn}, {optimizer_name(s, accel.device)}"
            + (", torch.compile (inductor)" if s.torch_compile else "")
        )
        self.say(describe_memory(self.memory, plan["num_processes"], fsdp_launch(), accel.device.type))
        self.peak_tflops = device_peak_tflops(accel.device, s.mixed_precision, s.peak_tflops)
        if accel.distributed_type == DistributedType.FSDP:
            self.say(
                f"  sharding    FSDP{accel.state.fsdp_plugin.fsdp_version} over {accel.num_processes} processes, "
                f"one unit per block: {self.wrap_text}"
            )

    # ------------------------------------------------------------------ 3. one optimizer step
    def train_step(self, step: int, batch: torch.Tensor) -> dict:
        """Forward, backward and update on this process's rows of one step (`grad_accum` micro-batches one after
        the other); the losses, reduced over processes."""
        s, accel, model, mb = self.s, self.accelerator, self.model, self.s.micro_batch_size
        sums = torch.zeros(3, device=accel.device)  # loss, lm loss, kl
        grad_norm = None
        for micro in range(s.grad_accum):
            ids = batch[micro * mb : (micro + 1) * mb].to(accel.device)
            with accel.accumulate(model):
                logits = self.task.logits(model, ids)
                lm = self.task.loss(logits, ids)
                loss, kl = lm, torch.zeros((), device=lm.device)
                if self.teacher is not None:
                    with torch.no_grad(), accel.autocast():
                        t_logits = self.task.logits(self.teacher, ids)
                    kl = kd_loss(self.task.scored(logits), self.task.scored(t_logits), s.kd_temperature)
                    loss = (1 - s.kd_weight) * lm + s.kd_weight * kl
                if self.hooks.on_loss is not None:
                    loss = self.hooks.on_loss(step, loss)
                accel.backward(loss)
                grad_norm = None
                if accel.sync_gradients and s.max_grad_norm > 0:
                    grad_norm = accel.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach(), lm.detach(), kl.detach()]).float()
        self.scheduler.step()
        loss, lm, kl = accel.reduce(sums / s.grad_accum, "mean").tolist()
        norm = float(grad_norm) if grad_norm is not None else 0.0  # the same on every process
        if not math.isfinite(loss) or not math.isfinite(norm):
            self.stop_on_fault(
                step, f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
            )
        row = {"loss": loss, "lm_loss": lm, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": None}
        if self.teacher is not None:
            row["kl"] = kl
        if grad_norm is not None:
            row["grad_norm"] = norm
        return row

    def stop_on_fault(self, step: int, what: str) -> None:
        self.accelerator.end_training()
        keep = ckpt.complete_checkpoints(self.s)
        raise TrainingError(
            f"{what} at step {step}; stopped without saving. The last good checkpoint is "
            + (
                f"{keep[-1]} (step {ckpt.checkpoint_step(keep[-1])}); "
                f"rerun with resume: auto, after lowering lr or enabling clipping"
                if keep
                else "none"
            )
        )

    # ------------------------------------------------------------------ 4. evaluate, save
    def evaluate(self, step: int) -> None:
        if self.val_blocks is None:
            return
        s = self.s
        result = evaluate(
            self.accelerator, self.model, self.teacher, self.val_blocks, s.micro_batch_size, s.kd_temperature, self.task
        )
        self.metrics.log({"kind": "eval", "step": step, "tokens": step * self.plan["tokens_per_step"], **result})
        self.say(f"  step {step:<6} validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.3f}")

    def save(self, step: int) -> None:
        seconds = self.previous_seconds + time.time() - self.session_start
        state = {
            "step": step,
            "tokens": step * self.plan["tokens_per_step"],
            "train_seconds": seconds,
            "run": self.run_id,
        }
        streams = None
        if self.stream_states is not None:
            streams = {"num_processes": self.accelerator.num_processes, "parts": self.stream_states}
        self.last_checkpoint = ckpt.save_checkpoint(self.accelerator, self.s, step, state, streams).name

    # ------------------------------------------------------------------ 5. the loop
    def train(self) -> Summary:
        from tqdm.auto import tqdm

        s, plan, total = self.s, self.plan, self.plan["total_steps"]
        if self.resume_from is None:
            self.evaluate(0)
        bar = tqdm(
            total=total,
            initial=self.start_step,
            disable=self.options.quiet or not self.accelerator.is_main_process,
            unit="step",
            dynamic_ncols=True,
        )
        loader = make_loader(self.dataset, s.num_workers, self.start_step, total)
        batches = iter(loader)
        self.session_start, measured_from = time.time(), None
        self.last_step, self.stopped_early = self.start_step, False
        self.data_wait, self.wait_measured = 0.0, 0.0  # waiting for data, and waiting + stepping (from step 2 on)
        try:
            for step in range(self.start_step + 1, total + 1):
                started = time.perf_counter()
                item = next(batches)
                waited = time.perf_counter() - started
                if isinstance(item, dict):  # a stream's batch, with its part's state when a checkpoint may follow
                    assert item["step"] == step, (item["step"], step)
                    if item["state"] is not None:
                        self.stream_states[item["part"]] = item["state"]
                    item = item["batch"]
                row = self.train_step(step, item)
                row["data_wait_s"] = waited
                if step > self.start_step + 1:  # the first batch waits for the workers to start
                    self.data_wait += waited
                    self.wait_measured += time.perf_counter() - started  # waiting + the step itself
                if self.hooks.after_step is not None:
                    self.hooks.after_step(step)
                now = time.time()
                if measured_from is None:
                    measured_from = (now, step)  # the first step pays one-off costs; measure from its end
                steps_measured = step - measured_from[1]
                speed = steps_measured * plan["tokens_per_step"] / (now - measured_from[0]) if steps_measured else None
                row = {"kind": "train", "step": step, "tokens": step * plan["tokens_per_step"], **row}
                row["tokens_per_s"] = speed  # keeps its place among the keys
                row["peak_memory_mib"] = peak_memory(self.accelerator.device) / 2**20
                row["mfu"] = mfu(plan["flops_per_token"], speed, self.peak_tflops, plan["num_processes"])
                self.metrics.log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{speed or 0:.0f}", refresh=False)
                if steps_measured == 3:
                    left = (total - step) * plan["tokens_per_step"] / speed
                    self.say(
                        f"  measured    {speed:,.0f} tokens/s over steps {step - 2}-{step}: {total - step} steps "
                        f"left, about {duration(left)} of training (evaluations and checkpoints not counted)"
                    )
                out_of_time = self.out_of_time(step)
                if (s.eval_every and step % s.eval_every == 0) or step == total or out_of_time:
                    self.evaluate(step)
                if s.save_every and step % s.save_every == 0:
                    self.save(step)
                self.last_step = step
                if out_of_time and step < total:
                    self.stopped_early = True
                    self.say(f"  stopped     at step {step} of {total}: max_seconds ({s.max_seconds:g} s) reached")
                    break
        finally:
            bar.close()
            del batches, loader  # stops the workers
        return self.finish()

    def out_of_time(self, step: int) -> bool:
        """max_seconds: whether the training time so far (resumed sessions included) has passed it, once min_steps
        are done. Every process must stop at the same step, so the processes' answers are reduced (any one out of
        time stops all)."""
        s = self.s
        if s.max_seconds is None or step < s.min_steps:
            return False
        late = self.previous_seconds + time.time() - self.session_start >= s.max_seconds
        flag = torch.tensor([float(late)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def source_report(self, steps: int | None = None) -> list[dict]:
        """Each training source: its weight, the tokens the whole run draws from it (over `steps`, default the
        planned steps), its token cache."""
        s, plan = self.s, self.plan
        steps = plan["total_steps"] if steps is None else steps
        weights, procs = self.data.get("weights") or mixture.exact_weights([1.0]), plan["num_processes"]
        if s.streaming:  # each process's parts take turns at the steps, with their own quotas
            rows = mixture.rows_per_source(steps, s.micro_batch_size * s.grad_accum, weights,
                                           max(s.num_workers, 1))  # fmt: skip
            rows = [r * procs for r in rows]
        else:
            rows = mixture.rows_per_source(steps, plan["global_batch"], weights)
        sources = self.data.get("sources") or [{"name": self.data["train_name"], "weight": 1.0}]
        return [{**src, "tokens": r * s.block_tokens} for src, r in zip(sources, rows)]

    # ------------------------------------------------------------------ 6. the result
    def finish(self) -> Summary:
        s, plan = self.s, self.plan
        train_seconds = self.previous_seconds + time.time() - self.session_start
        evals, train_rows = self.metrics.of_kind("eval"), self.metrics.of_kind("train")
        steps = self.last_step  # the planned steps, unless max_seconds stopped the run earlier
        tokens = steps * plan["tokens_per_step"]
        summary: Summary = {
            "model_dir": str(Path(s.output_dir) / "model"),
            "settings": s.model_dump(),
            "run": self.run_id,
            "data": self.data["train_name"],
            "validation": self.data.get("val_name"),
            "steps": steps,
            "planned_steps": plan["total_steps"],
            "stopped_early": self.stopped_early,
            "global_batch": plan["global_batch"],
            "warmup_steps": plan["warmup_steps"],
            "tokens": tokens,
            "compute_fraction": tokens / s.pretraining_tokens if s.pretraining_tokens else None,
            "num_processes": plan["num_processes"],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "teacher_params": self.teacher_params,
            "flops_estimate": plan["flops_per_token"] * tokens,
            "memory_estimate": self.memory.as_dict(),
            "peak_memory_mib": max((r["peak_memory_mib"] for r in train_rows), default=None),
            "train_seconds": train_seconds,
            "tokens_per_s": (tokens - self.start_step * plan["tokens_per_step"])
            / max(time.time() - self.session_start, 1e-9),
            "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
            "initial_eval": evals[0] if evals else None,
            "final_eval": evals[-1] if evals else None,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "last_checkpoint": self.last_checkpoint,
            "data_sources": self.source_report(steps),
            "data_wait_fraction": self.data_wait / self.wait_measured if self.wait_measured else None,
        }
        final = ckpt.save_output(self.accelerator, self.model, s, self.tokenizer, summary, self.metrics.rows)
        self.accelerator.end_training()
        first, last = summary["initial_eval"], summary["final_eval"]
        ppl = f"validation perplexity {first['val_ppl']:.3f} -> {last['val_ppl']:.3f}, " if last else ""
        self.say(f"done: {final} ({ppl}{tokens:,} tokens, {duration(train_seconds)})")
        return self.publish(summary)


def uptrain(settings: Settings, options: Options | None = None, hooks: Hooks | None = None) -> Summary:
    """Run (or resume, or find already finished) one uptraining run; its training summary.

    Raises SettingsError (bad settings or inputs, before any compute), convert.text.sources.DataError (unreadable data)
    or TrainingError (a non-finite loss; the last checkpoint is kept). Under several processes the summary is
    complete on the main process (the one that writes metrics.jsonl); the others see this session's rows only.
    """
    import logging

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and forked workers deadlock
    # accelerate warns on every checkpoint of a model with tied embeddings that it stored the shared tensor once
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()  # the token cache's map and filter
    run = Uptraining(settings, options, hooks)
    finished = run.check()
    if finished is not None:
        return finished
    run.setup()
    return run.train()


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    """The command line: `CONFIG.yaml key=value ... [--quiet] [--json]`; exit 0, 2 (bad input) or 1 (fault)."""

    try:
        settings, options = load_settings(sys.argv[1:] if argv is None else argv)
        summary = uptrain(settings, options, hooks)
    except (SettingsError, DataError) as e:
        if is_main_rank():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, ckpt.WriteError, PublishError) as e:
        if is_main_rank():
            print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        if is_main_rank():  # a full disk outside the checkpoint and model writes (metrics, logs)
            print(
                f"error: {e}: free space (or lift the file-size limit), then rerun with resume: auto", file=sys.stderr
            )
        return 1
    if options.json and is_main_rank():
        print(json.dumps(summary, indent=2))
    return 0
