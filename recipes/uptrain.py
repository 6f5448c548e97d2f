#!/usr/bin/env python
"""Uptrain a converted GQA/MQA checkpoint: budgeted continued pretraining on accelerate.

Converting multi-head attention to grouped-query (GQA) or multi-query (MQA) attention costs quality; the GQA paper
(Ainslie et al., 2023) wins it back by continuing pretraining for a small fraction alpha of the original steps
(alpha = 5%). This launcher runs the library that does it, `convert.uptrain` (read convert/uptrain/loop.py top to
bottom), on one CPU, one GPU, or many GPUs and nodes through `accelerate launch`:

    # one process (CPU or one GPU)
    python recipes/uptrain.py recipes/configs/smollm2-mqa-cpu.yaml
    accelerate launch recipes/uptrain.py recipes/configs/smollm2-mqa-cpu.yaml max_steps=20 --lr 3e-4

    # several processes on one machine (GPUs, or CPU processes over gloo), DDP
    accelerate launch --config_file recipes/accelerate_ddp.yaml --num_processes 8 \
        recipes/uptrain.py recipes/configs/smollm2-mqa-cpu.yaml

    # a 7B llama sharded with FSDP over 2 nodes x 8 GPUs (run on every node with its --machine_rank)
    accelerate launch --config_file recipes/accelerate_fsdp.yaml --num_machines 2 --num_processes 16 \
        --machine_rank 0 --main_process_ip HOST recipes/uptrain.py recipes/configs/llama-7b-fsdp.yaml

The same runs from an installed package: `accelerate launch -m convert.uptrain CONFIG.yaml ...`, or
`gqa-convert uptrain CONFIG.yaml ...` for one process; CONFIG may name a shipped config (`smollm2-mqa-cpu`).

Settings come from a YAML file with `key=value` or `--key value` overrides after it (recipes/README.md lists
them); `--quiet` drops the progress bar and the chatter, `--json` prints the training summary as JSON on stdout.
Everything a run writes lands in `output_dir`:
    checkpoints/step-000100/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    metrics.jsonl              one row per step ("train") and per evaluation ("eval")
    loss.png                   train and validation loss against tokens
    logs/                      accelerate trackers (tensorboard when installed)
    model/                     the result: safetensors + tokenizer + model card + training_summary.json
The data order is a pure function of (seed, step), so `resume: auto` restarts exactly where a checkpoint was taken.
"""

import sys

try:
    from convert.uptrain import main
except ImportError as e:
    if type(e).__name__ == "MissingExtra":  # gqa-convert is there, the uptrain extra is not
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(f"error: cannot import gqa-convert ({e}): install it first, `pip install -e .` in the checkout")

if __name__ == "__main__":
    sys.exit(main())
