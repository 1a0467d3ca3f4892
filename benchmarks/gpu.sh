#!/usr/bin/env bash
# The GPU benchmark table in one command: prx-small-pixel at 512 px (per-GPU batch 32 = the recipe's 1024 over
# 32 GPUs) and 1024 px (batch 16 = 512 / 32), bf16 autocast, each
#   - denoiser alone (flow loss only), and the recipe (LPIPS 0.1, P-DINO 0.01, REPA 0.5 at 512 px only, TREAD 50 %),
#   - without and with torch.compile of the blocks,
# plus pixrun's denoiser against diffusers' PRXTransformer2DModel at both sizes, and first a check that an ordinary
# step makes no host synchronisation (torch.cuda.set_sync_debug_mode("error")). One JSON object per line goes to
# benchmarks/gpu_<device>_<date>.jsonl; the human-readable lines go to the terminal.
#
#     bash benchmarks/gpu.sh            # STEPS=20 WARMUP=5 by default; PYTHON=.venv/bin/python
#
# No weights are downloaded: LPIPS runs its VGG16 with random weights and P-DINO / REPA a random DINOv2-B/14 with
# registers saved here first: the same shapes, so the same FLOPs and time as the real networks (losses meaningless).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
OUT=benchmarks/gpu_${DEVICE}_$(date -u +%Y%m%d).jsonl
DINO=$(mktemp -d)/dinov2-with-registers-base-random
"$PYTHON" - "$DINO" <<'EOF'
import sys

import transformers

config = transformers.Dinov2WithRegistersConfig(patch_size=14, image_size=518)  # ViT-B/14, 4 registers
transformers.Dinov2WithRegistersModel(config).save_pretrained(sys.argv[1])
EOF

bench() {
    "$PYTHON" -m pixrun.cli bench configs/prx-small-pixel.yaml train.precision=bf16 "$@" \
        --steps "$STEPS" --warmup "$WARMUP" --json | tee -a "$OUT" | "$PYTHON" -c \
        "import json, sys; from pixrun.bench import format_report; print(format_report(json.loads(sys.stdin.read())))"
}

"$PYTHON" benchmarks/sync_check.py configs/prx-small-pixel.yaml train.batch_size=8 | tee -a "$OUT"
"$PYTHON" benchmarks/sync_check.py configs/prx-small-pixel.yaml train.batch_size=8 tread.enabled=true | tee -a "$OUT"

RECIPE="lpips.weight=0.1 lpips.random_init=true pdino.weight=0.01 pdino.source=$DINO tread.enabled=true"
for size in "512 32" "1024 16"; do
    read -r res batch <<< "$size"
    shape="data.resolution=$res train.batch_size=$batch"
    repa=$([ "$res" = 512 ] && echo "repa.weight=0.5 repa.teacher=$DINO" || echo "repa.weight=0")
    for compile in false true; do
        bench $shape parallel.compile=$compile
        bench $shape parallel.compile=$compile $RECIPE $repa
    done
    bench $shape --compare-diffusers
done
# The speedrun's plan (docs/budget.md): its two stages, per-GPU batches 32 and 16, the recipe's losses; shapes data
# and the small text encoder stand in for the prepared shards and T5Gemma (the speedrun caches text embeddings).
STAGES="[{until_step: 100000, resolution: 512, batch_size: 1024, budget_share: 0.7},
  {until_step: 120000, resolution: 1024, batch_size: 512, losses: [lpips, pdino], budget_share: 0.3}]"
"$PYTHON" -m pixrun.cli plan configs/prx-small-pixel.yaml train.precision=bf16 parallel.compile=true $RECIPE \
    "repa.weight=0.5" "repa.teacher=$DINO" "stages=$STAGES" train.steps=120000 data.resolution=1024 \
    --budget 24h --devices 32 --price 2 --json | tee -a "$OUT"
# Fine-tuning prx-512-t2i (docs/finetune.md): its stand-in at full depth (random weights, the release's shapes)
"$PYTHON" benchmarks/finetune_bench.py runs/prx-512-standin-gpu --depth 16 --text-depth 26 --batch 16 --steps 5 \
    --warmup 3 --device cuda --out "${OUT%.*}-finetune.json"
echo "wrote $OUT"
