#!/usr/bin/env bash
# Quality of diffusers-gac against the peers a user would pick instead (torchao, optimum-quanto, bitsandbytes NF4) on
# the embedded digits model, each at the bit widths it supports, from one sweep: every run lands in one JSONL file and
# the table is written from all of them (docs/results/peers.md).
#   bash benchmarks/peers_quality.sh [OUTPUT_PREFIX]     (default docs/results/peers)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-docs/results/peers}
run="python benchmarks/ptq_compare.py --model digits --seeds 0 1 2 --jsonl $prefix.jsonl --workers 2"
$run --bits W4A4 --methods fp rtn gac
$run --bits W8A8 --methods rtn gac torchao quanto quanto-special-fp
$run --bits W4A8 --methods rtn gac quanto quanto-special-fp
$run --bits W4A16 --methods rtn gac quanto quanto-special-fp bnb-nf4 --table "$prefix.md"
