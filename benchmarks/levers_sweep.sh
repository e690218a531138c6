#!/usr/bin/env bash
# The activation-side levers for W4A4 (docs/levers.md) on an embedded model: every run lands in one JSONL file (a rerun
# only does the runs it lacks) and the table is written from all of them. DDIM 25; with a second argument "100", also
# the rows that decide between the settings at DDIM 100 (each run samples 4x longer).
#   bash benchmarks/levers_sweep.sh photos|digits [100]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: levers_sweep.sh photos|digits [100]}
prefix=docs/results/levers_$model
all=act_group_size=16,act_clipping=true,smoothing=true,lowrank_rank=4     # every lever, float16 factors
all8=$all,lowrank_bits=8                                                  # ... with int8 factor codes
nogroups8=act_clipping=true,smoothing=true,lowrank_rank=4,lowrank_bits=8  # without per-group ranges (CPU speed)
run="python benchmarks/ptq_compare.py --model $model --bits W4A4 --seeds 0 1 2 --jsonl $prefix.jsonl --workers 2"
$run --steps 25 --methods fp rtn "rtn:$all" qdiffusion "qdiffusion:$all" gac "gac:$all" "qdiffusion:$nogroups8" \
    "qdiffusion:$all8" "gac:$all8"
if [ "$model" = photos ]; then  # each lever alone, and combinations, before any reconstruction
    $run --steps 25 --methods rtn:act_group_size=8 rtn:act_group_size=16 rtn:smoothing=true rtn:lowrank_rank=4 \
        rtn:act_clipping=true rtn:act_group_size=16,act_clipping=true,lowrank_rank=4 rtn:lowrank_rank=2 \
        rtn:act_group_size=8,act_clipping=true,smoothing=true,lowrank_rank=4
    $run --steps 25 --methods "qdiffusion:$all,lr_lowrank=0.0001"  # factor refinement (float16 factors only)
fi
if [ "${2:-}" = 100 ]; then
    $run --steps 100 --methods fp qdiffusion "qdiffusion:$all8"
fi
$run --steps 25 --methods fp --table "$prefix.md" --table-command "bash benchmarks/levers_sweep.sh $*"  # writes the table
