#!/usr/bin/env bash
# The GPU benchmark table in one command, in priority order, each result appended as soon as it is measured (a lent
# GPU comes with about 15 minutes, its start-up included, and 10 a command):
#   1. (about 5 minutes on an H100) the check that an ordinary step makes no host synchronisation
#      (torch.cuda.set_sync_debug_mode("error")); one bf16 step of prx-small-pixel at 512 px (per-GPU batch 32 = the
#      recipe's 1024 over 32 GPUs) with the flow loss alone and with the recipe (LPIPS 0.1, P-DINO 0.01, REPA 0.5,
#      TREAD 50 %); pixrun's denoiser against diffusers' PRXTransformer2DModel at 512 px;
#   2. as time allows: the same with torch.compile of the blocks, the 1024-px rows (batch 16 = 512 / 32), the sync
#      check with TREAD, the speedrun's plan and the fine-tune stand-in.
# One JSON object per line goes to $RESULTS/gpu_<device>_<date>.jsonl (RESULTS: the device tool's $OUT when set,
# else benchmarks/); the human-readable lines go to the terminal.
#
#     bash benchmarks/gpu.sh            # STEPS=10 WARMUP=3 by default; PYTHON=.venv/bin/python
#
# No weights are downloaded: LPIPS runs its VGG16 with random weights and P-DINO / REPA a random DINOv2-B/14 with
# registers saved here first: the same shapes, so the same FLOPs and time as the real networks (losses meaningless).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
RESULTS=${OUT:-benchmarks}
RESULT=$RESULTS/gpu_${DEVICE}_$(date -u +%Y%m%d).jsonl
DINO=$(mktemp -d)/dinov2-with-registers-base-random
"$PYTHON" - "$DINO" <<'EOF'
import sys

import transformers

config = transformers.Dinov2WithRegistersConfig(patch_size=14, image_size=518)  # ViT-B/14, 4 registers
transformers.Dinov2WithRegistersModel(config).save_pretrained(sys.argv[1])
EOF

bench() {
    "$PYTHON" -m pixrun.cli bench configs/prx-small-pixel.yaml train.precision=bf16 "$@" \
        --steps "$STEPS" --warmup "$WARMUP" --json | tee -a "$RESULT" | "$PYTHON" -c \
        "import json, sys; from pixrun.bench import format_report; print(format_report(json.loads(sys.stdin.read())))"
}

RECIPE="lpips.weight=0.1 lpips.random_init=true pdino.weight=0.01 pdino.source=$DINO tread.enabled=true"
AT_512="data.resolution=512 train.batch_size=32"
REPA_512="repa.weight=0.5 repa.teacher=$DINO"
AT_1024="data.resolution=1024 train.batch_size=16"

# 1. the sync check, one step without and with the recipe, the diffusers ratio
"$PYTHON" benchmarks/sync_check.py configs/prx-small-pixel.yaml train.batch_size=8 | tee -a "$RESULT"
bench $AT_512 parallel.compile=false
bench $AT_512 parallel.compile=false $RECIPE $REPA_512
bench $AT_512 --compare-diffusers

# 2. compiled, 1024 px, the sync check under TREAD
bench $AT_512 parallel.compile=true
bench $AT_512 parallel.compile=true $RECIPE $REPA_512
for compile in false true; do
    bench $AT_1024 parallel.compile=$compile
    bench $AT_1024 parallel.compile=$compile $RECIPE repa.weight=0
done
bench $AT_1024 --compare-diffusers
"$PYTHON" benchmarks/sync_check.py configs/prx-small-pixel.yaml train.batch_size=8 tread.enabled=true | tee -a "$RESULT"
# The speedrun's plan (docs/budget.md): its two stages, per-GPU batches 32 and 16, the recipe's losses; shapes data
# and the small text encoder stand in for the prepared shards and T5Gemma (the speedrun caches text embeddings).
STAGES="[{until_step: 100000, resolution: 512, batch_size: 1024, budget_share: 0.7},
  {until_step: 120000, resolution: 1024, batch_size: 512, losses: [lpips, pdino], budget_share: 0.3}]"
"$PYTHON" -m pixrun.cli plan configs/prx-small-pixel.yaml train.precision=bf16 parallel.compile=true $RECIPE \
    "repa.weight=0.5" "repa.teacher=$DINO" "stages=$STAGES" train.steps=120000 data.resolution=1024 \
    --budget 24h --devices 32 --price 2 --json | tee -a "$RESULT"
# Fine-tuning prx-512-t2i (docs/finetune.md): its stand-in at full depth (random weights, the release's shapes)
"$PYTHON" benchmarks/finetune_bench.py runs/prx-512-standin-gpu --depth 16 --text-depth 26 --batch 16 --steps 5 \
    --warmup 3 --device cuda --out "${RESULT%.*}-finetune.json"
echo "wrote $RESULT"
