#!/usr/bin/env bash
# The real run of recipes/RESULTS.md: SmolLM2-135M GQA-3 -> MQA (mean), uptrained four ways on WikiText-2 valid,
# scored on WikiText-2 test (12 x 512-token windows). Run from the repository root; takes about 30 minutes on a busy 2-core CPU.
set -euo pipefail
DATA=${GQA_DATA_DIR:-../shared/data}
ORIGINAL=$(python -c 'from convert.demo.smollm2 import materialize; print(materialize())')
CONFIG=recipes/configs/smollm2-mqa-cpu.yaml
STEPS=${STEPS:-48}
# One thread: on a CPU shared with other jobs, OpenMP threads waiting on each other made steps 3-6x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[ -d runs/smollm2-135m-mqa ] || gqa-convert convert "$ORIGINAL" runs/smollm2-135m-mqa --num-kv-heads 1 --method mean

common=(data="$DATA/wikitext-2/valid.txt" max_steps="$STEPS" micro_batch_size=1 save_every=0 resume=never)
python recipes/uptrain.py $CONFIG output_dir=runs/up-full "${common[@]}" train=full lr=3e-4
python recipes/uptrain.py $CONFIG output_dir=runs/up-lora "${common[@]}" train=lora lr=1e-3
python recipes/uptrain.py $CONFIG output_dir=runs/up-full-teacher "${common[@]}" train=full lr=3e-4 \
    teacher="$ORIGINAL" kd_weight=0.5
python recipes/uptrain.py $CONFIG output_dir=runs/up-lora-teacher "${common[@]}" train=lora lr=1e-3 \
    teacher="$ORIGINAL" kd_weight=0.5

python recipes/wikitext_ppl.py "$DATA/wikitext-2/test.txt" "$ORIGINAL" runs/smollm2-135m-mqa \
    runs/up-full/model runs/up-lora/model runs/up-full-teacher/model runs/up-lora-teacher/model
