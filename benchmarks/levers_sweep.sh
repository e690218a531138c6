#!/usr/bin/env bash
# The activation-side levers for W4A4 (docs/levers.md) on an embedded model, from one sweep: every run lands in one
# JSONL file (a rerun only does the runs it lacks) and the table is written from all of them. DDIM 25 by default;
# a second argument sets the steps (its own files, *_ddim<steps>), with the rows that decide between the settings.
#   bash benchmarks/levers_sweep.sh photos|digits [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: levers_sweep.sh photos|digits [STEPS]}
steps=${2:-25}
prefix=docs/results/levers_$model
[ "$steps" = 25 ] || prefix=${prefix}_ddim$steps
all=act_group_size=16,act_clipping=true,smoothing=true,lowrank_rank=4  # every lever, float16 factors
all8=$all,lowrank_bits=8                                                 # ... with int8 factor codes
nogroups8=act_clipping=true,smoothing=true,lowrank_rank=4,lowrank_bits=8  # without per-group ranges (CPU speed)
run="python benchmarks/ptq_compare.py --model $model --bits W4A4 --seeds 0 1 2 --steps $steps --jsonl $prefix.jsonl --workers 2"
if [ "$steps" != 25 ]; then
    $run --methods fp rtn qdiffusion "qdiffusion:$nogroups8" "qdiffusion:$all8" --table "$prefix.md"
    exit
fi
$run --methods fp rtn "rtn:$all" qdiffusion "qdiffusion:$all" gac "gac:$all"
if [ "$model" = photos ]; then  # each lever alone, and combinations, before any reconstruction
    $run --methods rtn:act_group_size=8 rtn:act_group_size=16 rtn:smoothing=true rtn:lowrank_rank=4 \
        rtn:act_clipping=true rtn:act_group_size=16,act_clipping=true,lowrank_rank=4 rtn:lowrank_rank=2 \
        rtn:act_group_size=8,act_clipping=true,smoothing=true,lowrank_rank=4
fi
$run --methods "qdiffusion:$nogroups8" "qdiffusion:$all8" --table "$prefix.md"
