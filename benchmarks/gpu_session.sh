#!/usr/bin/env bash
# The GPU measurements the CUDA integer path still owes (docs/results/inference_speed_cuda.md), in one call of at
# most 10 minutes on a machine with a CUDA GPU: each step has its own time limit, so a step that runs long (a slow
# compile) leaves the others' results. Every step writes its log and table under $OUT (default gpu_out/).
#   1. layer checks, the weight storages' exactness (float8 included), the dense and float8 paths of "auto" against
#      the reference and its timed choice on SD-sized layers, the SD-sized UNet against the reference,
#      channels-last layers on every path, and layers on a second GPU where there is one (benchmarks/gpu_check.py,
#      no tile sweep)
#   2. host time per layer call, integer layers against bf16 ones (benchmarks/layer_overhead.py); what the kernels
#      compile to is read without a GPU (benchmarks/gpu_codegen.py --arch 90)
#   3. eager and CUDA-graph steps at latent 128 and 64, batch 2, 1 and 4 (the table of issue 19, item 3), and "auto"
#      W4A4 eager and as a CUDA graph at batch 4 beside bf16 (step 4 has it at batch 2 and 1): goal 3 asks for
#      "auto" at every size
#   4. W4A4's paths: the integer kernels on packed and float8 weights (int4_storage), the dense path, the float8
#      GEMMs path, and "auto" choosing per layer between them, eager and as CUDA graphs, and bf16 and "auto" with
#      diffusers' fused q/k/v projections (fuse_qkv_projections), and bf16 and "auto" channels-last (the model and
#      its sample in torch.channels_last), at latent 128 and 64, batch 2 and 1: a step of its own, so that its new
#      kernel variants compiling cannot cost step 3 its table (each size's rows are written as they finish)
#   5. torch.compile of bf16, of the integer W4A4/W8A8 models and of "auto" W4A4 (one eager step first, whose
#      per-layer choices the compiled model takes) at latent 128, batch 2 (the goal's size)
#   6. torchao's int8 dynamic quantization compiled, the same size (its compile was the slow one before)
#   then the goals judged from those tables (benchmarks/gpu_goals.py, no GPU work: $out/gpu_goals.md)
#   OUT=/some/dir bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'" || exit 1
speed="python benchmarks/inference_speed.py --models sd --device cuda --rounds 10 --warmup 2"

step() {  # step LIMIT_S NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   rc $? at ${SECONDS} s"
    tail -n 4 "$out/$name.log"
}

step 65 check python benchmarks/gpu_check.py --skip-sweep
step 30 overhead python benchmarks/layer_overhead.py --device cuda --calls 500 --rounds 5 \
    --output "$out/layer_overhead_cuda.md"
step 150 eager $speed --latents 128 64 --batch 2 1 4 --variants fp32 bf16 bf16_fake_w4a4 bf16_int_w8a8 \
    bf16_int_w4a8 bf16_int_w4a4 graph_bf16 graph_bf16_int_w8a8 graph_bf16_int_w4a4 bf16_bnb_nf4 \
    --output "$out/cuda.md"
step 30 auto4 $speed --latents 128 64 --batch 4 --variants bf16 bf16_auto_w4a4 graph_bf16 graph_bf16_auto_w4a4 \
    --output "$out/cuda_auto_batch4.md"
step 125 paths $speed --latents 128 64 --batch 2 1 --variants bf16 bf16_int_w4a4 bf16_int_w4a4_fp8 \
    bf16_dense_w4a4 bf16_scaled_w4a4 bf16_auto_w4a4 graph_bf16 graph_bf16_int_w4a4 graph_bf16_scaled_w4a4 \
    graph_bf16_auto_w4a4 fused_bf16 fused_bf16_auto_w4a4 cl_bf16 cl_bf16_auto_w4a4 --output "$out/cuda_paths.md"
step 125 compiled $speed --latents 128 --batch 2 --variants bf16 compiled_bf16 compiled_bf16_int_w8a8 \
    compiled_bf16_int_w4a4 compiled_bf16_auto_w4a4 --output "$out/cuda_compiled.md"
step 65 torchao $speed --latents 128 --batch 2 --variants bf16 compiled_bf16_torchao_w8a8 \
    --output "$out/cuda_torchao.md"
python benchmarks/gpu_goals.py "$out"/cuda*.md --output "$out/gpu_goals.md" > "$out/gpu_goals.log" 2>&1
echo "== goals: $out/gpu_goals.md (rc $?)"
