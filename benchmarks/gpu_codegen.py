"""What the GPU kernels compile to, without a GPU: the PTX of each Triton kernel as a CUDA GPU would run it.

Triton compiles for a target it is told (``--arch 90``: Hopper, H100/H200; ``80``: Ampere) with the compiler it
ships, so the code of ``quant/gpukernels.py`` can be read on any machine. The layers of an SD-1.5-sized UNet are
called on the GPU path with CPU tensors and their kernel launches are caught instead of run; each launch is
specialised exactly as Triton's JIT would specialise it (its own binder: the same constants, divisibility and
alignment) and compiled. Counted per kernel, in the PTX (static instructions, not executions):

The dense path of ``execution="auto"`` (``quant/gpudense.py``: its input fake-quantization and weight
dequantization kernels; its GEMM is PyTorch's) is compiled for each layer too (rows ``W4A4 dense``).

* global stores by width (``st.global.b16`` is one bfloat16 at a time, ``.v4.b32`` 16 bytes at a time);
* global loads, asynchronous copies to shared memory (``cp.async``), and the tensor-core instructions (``wgmma``
  on Hopper, ``mma`` on Ampere);
* the shared memory the kernel asks for;
* how many tensor-core operations stay in flight when the loop moves on (``wgmma`` waits in the TTGIR: ``pendings
  0`` waits for every one before the next step, ``1`` overlaps one with the next step's work). A plain GEMM loop
  compiled in int8, float8 and float16 beside them (``probe``) shows whether that is the kernel's doing or Triton's.

It says how the code is shaped (vector widths, tensor-core use, pipelining), not how fast it runs: timing needs a
GPU (``benchmarks/gpu_session.sh``).

    python benchmarks/gpu_codegen.py --output docs/results/gpu_codegen.md
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from diffusers_gac.quant import gpudense, gpuexec, gpukernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (benchmarks/report.py)
from layer_overhead import NoLaunch, frozen_layer  # noqa: E402

LAYERS = {  # name -> (module, input shape at latent 128, batch 2): SD 1.5's layer kinds
    "conv 3x3 320 @128": (lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 128, 128)),
    "conv 3x3 1280 @32": (lambda: nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 32, 32)),
    "conv 3x3 640 stride 2 @128": (lambda: nn.Conv2d(640, 640, 3, stride=2, padding=1), (2, 640, 64, 64)),
    "conv 1x1 640 -> 320 @64": (lambda: nn.Conv2d(640, 320, 1), (2, 640, 64, 64)),
    "linear 320 -> 2560 x16384": (lambda: nn.Linear(320, 2560), (2, 16384, 320)),
    "linear 1280 -> 1280 x1024": (lambda: nn.Linear(1280, 1280), (2, 1024, 1280)),
}
# w_bits, a_bits, how 4-bit weights stay resident (int4_storage): packed (the default), int8 and float8 carriers
BITS = [(8, 8, "packed"), (4, 4, "packed"), (4, 4, "int8"), (4, 4, "fp8")]
PATTERN = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:st\.global|ld\.global|cp\.async\.c[ag]|cp\.async\.bulk|wgmma\.mma_async|"
                     r"mma\.sync)[\w.:]*)", re.M)


def compile_launch(kernel, args: tuple, kwargs: dict, target):
    """The kernel as Triton's JIT would compile this launch for ``target``."""
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def summarize(compiled) -> dict:
    counts = collections.Counter(m.group(1) for m in PATTERN.finditer(compiled.asm["ptx"]))
    stores = {k.removeprefix("st.global."): v for k, v in counts.items() if k.startswith("st.global")}
    loads = {k.removeprefix("ld.global."): v for k, v in counts.items() if k.startswith("ld.global")}
    copies = sum(v for k, v in counts.items() if k.startswith("cp.async"))
    tensor = {k.split(".")[0] + "." + k.split(".")[-3] + "." + k.split(".")[-1] if k.startswith("wgmma") else k: v
              for k, v in counts.items() if k.startswith(("wgmma", "mma"))}
    waits = sorted(set(re.findall(r"warp_group_dot_wait[^{]*\{pendings = (\d+)", compiled.asm["ttgir"])))
    return {"stores": stores, "loads": loads, "cp.async": copies, "tensor": tensor, "shared": compiled.metadata.shared,
            "waits": "/".join(waits) or "-"}


def fmt(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


def probe(target) -> list[tuple[str, dict]]:
    """A plain tiled GEMM (no gathers, no scales), int8, float8 e4m3 and float16, compiled like the layers' kernels."""
    from triton.compiler import ASTSource, compile

    tl = gpukernels.tl

    @gpukernels.triton.jit
    def gemm(a_ptr, b_ptr, c_ptr, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INT: tl.constexpr):
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.int32 if INT else tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + offs_m[:, None] * K + (k + offs_k)[None, :])
            b = tl.load(b_ptr + offs_n[:, None] * K + (k + offs_k)[None, :])
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32 if INT else tl.float32)
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.float32))

    out = []
    for dtype in ("i8", "fp8e4nv", "fp16"):
        signature = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*fp32", "N": "i32", "K": "i32",
                     "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "INT": "constexpr"}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
        constexprs = {(5,): 128, (6,): 128, (7,): 64, (8,): dtype == "i8"}
        compiled = compile(ASTSource(gemm, signature, constexprs, attrs), target=target,
                           options={"num_warps": 8, "num_stages": 4})
        out.append((f"plain GEMM {dtype}", summarize(compiled)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: Hopper, 80: Ampere)")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    parser.add_argument("--layouts", nargs="+", choices=["channels-first", "channels-last"],
                        default=["channels-first", "channels-last"],
                        help="memory formats of the convolutions' inputs (channels-last: diffusers' "
                             "unet.to(memory_format=torch.channels_last); the output follows the input)")
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if gpukernels.triton is None:
        sys.exit("Triton is not installed")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    start = time.time()
    calls = []
    # the layers are laid out as on the target GPU (float8 weights where it has float8 tensor cores), on CPU tensors
    gpuexec.fp8_tensor_cores = lambda device: args.arch >= 89
    gpukernels.quantize_kernel = NoLaunch(gpukernels.quantize_kernel, calls)
    gpukernels.igemm_kernel = NoLaunch(gpukernels.igemm_kernel, calls)
    gpudense.fake_quantize_kernel = NoLaunch(gpudense.fake_quantize_kernel, calls)
    gpudense.dequantize_kernel = NoLaunch(gpudense.dequantize_kernel, calls)
    gpuexec.F = types.SimpleNamespace(conv2d=lambda x, *a: x, linear=lambda x, *a: x)  # the dense op is PyTorch's
    rows = []
    for name, layout in [(n, f) for n in args.layers for f in args.layouts if f == args.layouts[0] or "conv" in n]:
        make, shape = LAYERS[name]
        torch.manual_seed(0)
        module = make()
        x = torch.randn(shape, dtype=torch.bfloat16)
        if layout == "channels-last":
            x, name = x.to(memory_format=torch.channels_last), f"{name} channels-last"
        for w_bits, a_bits, storage in BITS + [(4, 4, "dense")]:
            layer = frozen_layer(module, w_bits, a_bits, "packed" if storage == "dense" else storage)
            bits = f"W{w_bits}A{a_bits}" + (f" {storage}" if storage != "packed" else "")
            calls.clear()
            with torch.no_grad():
                if storage == "dense":  # the dense path of "auto" (its two kernels; the GEMM is PyTorch's)
                    plan = gpuexec.gpu_plan(layer)
                    gpuexec.dense_run(x, *plan.tensors, gpuexec._ranges(plan, x), plan.ints)
                else:
                    gpuexec.gpu_forward(layer, x)
            for kernel, kargs, kwargs in calls:
                s = summarize(compile_launch(kernel, kargs, kwargs, target))
                rows.append((name, bits, kernel.fn.__name__, s))
                print(f"{name} {bits} {kernel.fn.__name__}: stores {fmt(s['stores'])}; loads "
                      f"{fmt(s['loads'])}; cp.async {s['cp.async']}; tensor cores {fmt(s['tensor'])}; shared "
                      f"{s['shared']} B; waits {s['waits']}", flush=True)
    for name, s in probe(target):
        rows.append(("probe", "-", name, s))
    import triton

    lines = [f"Command: `{report.command()}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; Triton {triton.__version__} compiling for "
             f"sm_{args.arch} on a machine without a GPU; {time.time() - start:.0f} s. Static PTX instructions per "
             "kernel (a loop's body counts once); inputs bfloat16, at latent 128, batch 2.", "",
             "| layer | bits | kernel | global stores | global loads | cp.async | tensor-core instructions | "
             "in flight (wgmma pendings) | shared B |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {b} | {k} | {fmt(s['stores'])} | {fmt(s['loads'])} | {s['cp.async']} | {fmt(s['tensor'])} | "
              f"{s['waits']} | {s['shared']} |" for n, b, k, s in rows]
    report.emit("What the GPU kernels compile to", lines, args.output)

if __name__ == "__main__":
    main()
