#!/usr/bin/env bash
# Sample weightings (docs/results/gac.md) on an embedded model: uniform reconstruction (Q-Diffusion), learned weights
# (GAC, default and paper form), the fixed Fisher per-timestep weighting and PTQ4DM-style timesteps, in the paper's
# setting (static activation ranges every timestep shares, W4A8, W4A4 and W8A8) and in the default one (dynamic
# per-token ranges, W4A4). Calibration seeds 0 1 2, evaluation noise from seeds 1000 1001 1002. Every run lands in one
# JSONL file (a rerun only does the runs it lacks) and the table is written from all of them. GAC with
# influence-weighted validation joins both settings; static W4A8 also at DDIM 100, and on photos the default setting.
#   bash benchmarks/weighting_sweep.sh digits|photos [STEPS]    (DDIM steps, default 25)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: weighting_sweep.sh digits|photos [STEPS]}
steps=${2:-25}
prefix=docs/results/weighting_$model
run="python benchmarks/ptq_compare.py --model $model --seeds 0 1 2 --jsonl $prefix.jsonl --workers 2 --steps $steps"
static="--set act_scheme=static"
# the paper's setting first, the rows that decide first
$run --bits W4A8 $static --methods fp rtn qdiffusion gac gac-paper
$run --bits W4A4 W8A8 $static --methods rtn qdiffusion gac gac-paper
$run --bits W4A8 W4A4 $static --methods fisher ptq4dm
# the default: dynamic per-token ranges
$run --bits W4A4 --methods rtn qdiffusion gac gac-paper fisher ptq4dm
# uniform reconstruction given learned weights' time, where learned weights were to win
$run --bits W4A8 $static --methods gac --equal-time gac
$run --bits W4A4 --methods gac --equal-time gac
# learned weights judged by each sampler step's influence on the samples (gac_validation_weighting)
influence=gac:gac_validation_weighting=sample_influence
$run --bits W4A4 --methods "$influence"
$run --bits W4A8 $static --methods "$influence"
if [ "$model" = photos ]; then  # the default setting at DDIM 100, where errors compound over 4x the steps
    $run --steps 100 --bits W4A4 --methods fp qdiffusion gac  # the later --steps wins
fi
# the paper's setting at DDIM 100
$run --steps 100 --bits W4A8 $static --methods fp qdiffusion gac
$run --bits W4A4 --methods fp --table "$prefix.md" --table-command "bash benchmarks/weighting_sweep.sh $*"
