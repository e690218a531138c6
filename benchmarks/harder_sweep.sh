#!/usr/bin/env bash
# Learned sample weights (GAC) against uniform reconstruction in settings harder than the default (docs/results/gac.md):
# every layer at 4 bits (the first and last layers and the timestep embedding too), 3-bit weights with 8-bit
# activations, the attention matmuls quantized to 8 bits beside W4A4, and (digits) DDIM 100. Dynamic per-token
# activation ranges as in the default. Calibration seeds 0 1 2, evaluation noise from seeds 1000 1001 1002. Every run
# lands in one JSONL file (a rerun only does the runs it lacks) and the table is written from all of them.
#   bash benchmarks/harder_sweep.sh digits|photos
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: harder_sweep.sh digits|photos}
prefix=docs/results/harder_$model
run="python benchmarks/ptq_compare.py --model $model --seeds 0 1 2 --jsonl $prefix.jsonl --workers 2"
$run --bits W4A4 --set special_bits=4 --methods qdiffusion gac
$run --bits W3A8 --methods qdiffusion gac
$run --bits W3A8 --methods gac --equal-time gac  # uniform given learned weights' time
$run --bits W4A4 --set attn_bits=8 --methods qdiffusion gac
if [ "$model" = digits ]; then  # photos at DDIM 100: docs/results/weighting_photos.md
    $run --steps 100 --bits W4A4 --methods fp qdiffusion gac
fi
$run --bits W4A4 --methods fp --table "$prefix.md" --table-command "bash benchmarks/harder_sweep.sh $*"
