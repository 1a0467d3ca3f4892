#!/usr/bin/env bash
# Does a refactor leave results unchanged? Trains the default for 40 fixed steps on one thread with the code of
# git revision REV and with the working tree, samples and scores each run, and compares losses, weights, sample
# grids and scores byte for byte; then the same for the recipe's CPU twin (configs/prx-speedrun-cpu.yaml: two
# stages, Muon, REPA, TREAD, LPIPS and P-DINO, 8 steps). Prints IDENTICAL or what differs; exit 0 only when
# identical.
#   usage: benchmarks/same_results.sh REV [OUT]     (OUT: a scratch folder, default /tmp/pixrun-same-results)
set -euo pipefail
REV=${1:?usage: benchmarks/same_results.sh REV [OUT]}
OUT=${2:-/tmp/pixrun-same-results}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
rm -rf "$OUT" && mkdir -p "$OUT"
git -C "$ROOT" worktree add --detach "$OUT/rev" "$REV" > /dev/null
trap 'git -C "$ROOT" worktree remove --force "$OUT/rev"' EXIT

run() {  # SRC NAME: train, eval and sample with the package in SRC; a fingerprint of everything to NAME.txt
    local src=$1 name=$2 run_dir=$OUT/$2
    export PYTHONPATH=$src/src OMP_NUM_THREADS=1
    "$PYTHON" -m pixrun.cli train "run_dir=$run_dir" train.budget= train.steps=40 train.threads=1 \
        train.log_every=10 train.sample_every=20 train.checkpoint_every=20 > "$OUT/$name-train.log" 2>&1
    "$PYTHON" -m pixrun.cli eval "$run_dir" --per-task 2 --steps 10 --mse-t --json > "$OUT/$name-eval.json" 2> /dev/null
    "$PYTHON" -m pixrun.cli sample "$run_dir" --prompt "a photo of a red square left of a blue circle" --num 4 \
        --out "$OUT/$name-sample.png" > /dev/null 2>&1
    "$PYTHON" -m pixrun.cli train "$src/configs/prx-speedrun-cpu.yaml" "run_dir=$run_dir-recipe" \
        > "$OUT/$name-recipe-train.log" 2>&1
    {
        for folder in "$run_dir" "$run_dir-recipe"; do
            "$PYTHON" -c "import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r['step'], *(repr(r.get(k)) for k in ('loss', 'grad_norm', 'lr', 'lpips', 'pdino', 'repa')))" \
                "$folder/metrics.jsonl"
            (cd "$folder" && sha256sum checkpoints/*/weights.safetensors checkpoints/*/ema.safetensors samples/*.png)
        done
        cat "$OUT/$name-eval.json"
        (cd "$OUT" && sha256sum "$name-sample.png" | sed "s/$name-//")
    } > "$OUT/$name.txt"
}

run "$OUT/rev" before
run "$ROOT" after
if diff "$OUT/before.txt" "$OUT/after.txt"; then
    cat "$OUT/after.txt"
    echo "IDENTICAL: $REV and the working tree (losses, weights, EMA, sample grids, eval, MSE by t, a sample;" \
        "the recipe's twin: losses, weights, EMA, grids)"
else
    echo "DIFFERENT: $REV and the working tree (above: < $REV, > working tree)"
    exit 1
fi
