"""Host time per quantized layer call on the GPU path: what makes an eager step launch-bound at small batches.

A W4A4 step of the SD-sized UNet on an H200 took 57 ms eager at latent 64 at any batch size, against 15 ms replayed
as a CUDA graph (docs/results/inference_speed_cuda.md): the GPU waits for the host. This script times one layer
call on an input so small that the device work does not count, for SD-shaped layers:

* ``plan``: the layer as it runs (``gpuexec.gpu_forward``: the per-layer plan is built once and read per call);
* ``rebuilt``: the same call with the plan dropped before every call, so each call checks the layer and builds it
  again (what every call did before plans were cached);
* ``float``: the float layer the quantized one replaces, in bfloat16 (its own host work: one ``F.conv2d`` or
  ``F.linear``).

With ``--device cuda`` the Triton kernels run (their launches are host work too); each figure is the mean over
``--calls`` back-to-back calls with one synchronisation at the end (wall clock), the variants taking turns. With
``--device cpu`` (no GPU needed) the two Triton launches are replaced by no-ops and the layer takes the GPU path on
CPU tensors, so ``plan`` and ``rebuilt`` are the library's own host work per call without Triton's launcher
(``float`` is not timed: on the CPU it computes). CPU figures are process CPU time. On the CPU, ``binding`` is the
part of Triton's launcher that runs in Python, for a Hopper target (sm_90): for each of the call's two launches, what
``JITFunction.run`` does before it hands the launch to the driver (binding the arguments, specializing on their
alignment and divisibility, the kernel cache's key), so ``plan + binding`` bounds the host work of a call from below
(the driver's launch itself is left out).

    python benchmarks/layer_overhead.py --device cpu --output docs/results/layer_overhead_cpu.md
    python benchmarks/layer_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from diffusers_gac.quant import gpuexec, gpukernels, intexec
from diffusers_gac.quant.layers import QuantConv2d, QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (benchmarks/report.py)

LAYERS = {  # name -> (module, input shape): SD 1.5's layer kinds, inputs of 2x4 positions or 8 tokens
    "conv 3x3 320": (lambda: nn.Conv2d(320, 320, 3, padding=1), (1, 320, 2, 4)),
    "conv 3x3 1280, stride 2": (lambda: nn.Conv2d(1280, 1280, 3, stride=2, padding=1), (1, 1280, 2, 4)),
    "conv 1x1 640": (lambda: nn.Conv2d(640, 640, 1), (1, 640, 2, 4)),
    "linear 320 -> 2560": (lambda: nn.Linear(320, 2560), (1, 8, 320)),
    "linear 1280 -> 1280": (lambda: nn.Linear(1280, 1280), (1, 8, 1280)),
}


class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` does nothing, or records ``(kernel, args,
    kwargs)`` in ``calls`` instead of launching (here and in ``gpu_codegen.py``)."""

    def __init__(self, kernel=None, calls: list | None = None):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        if self.calls is None:
            return lambda *args, **kwargs: None
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def binding(launches: list, arch: int = 90):
    """A function doing, for each recorded launch, what Triton's ``JITFunction.run`` does in Python before the
    driver launches (bind the arguments, specialize them, compute the kernel cache's key) for a CUDA target of
    compute capability ``arch``; None where this Triton's internals differ from 3.9's. Kernels run by Triton's
    interpreter (``TRITON_INTERPRET=1``) are bound as the JIT would bind them."""
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        options = {"debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode,
                   "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}
        jits = [k if isinstance(k, JITFunction) else JITFunction(k.fn, **k.kwargs) for k, _, _ in launches]
        bound = [(create_function_from_signature(j.signature, j.params, backend), a, {**kw, **options})
                 for j, (_, a, kw) in zip(jits, launches)]
        cache: dict = {}
        for binder, args, kwargs in bound:
            binder(*args, **kwargs)
    except Exception:  # noqa: BLE001  (another Triton version: the column says "-")
        return None

    def bind():
        for binder, args, kwargs in bound:
            _, specialization, opts = binder(*args, **kwargs)
            compute_cache_key(cache, specialization, opts)

    return bind


def frozen_layer(module: nn.Module, w_bits: int = 4, a_bits: int = 4, int4_storage: str = "packed") -> nn.Module:
    """A frozen layer (dynamic per-token inputs, round-to-nearest weights) in the integer kernels' layout."""
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    layer = cls.from_module(module, w_bits=w_bits, a_bits=a_bits, weight_init="minmax", act_scheme="dynamic")
    layer.freeze()
    if not layer.set_execution("integer", int4_storage):
        raise RuntimeError(f"{module} does not take the integer layout here")
    return layer


def per_call_us(fns: list, calls: int, device: torch.device, rounds: int) -> list[float]:
    """Per function, the least over ``rounds`` of the mean time of ``calls`` back-to-back calls (one sync at the end),
    in us; the functions take turns round by round, so a slower spell of the machine hits them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for fn in fns:
        for _ in range(max(10, calls // 10)):
            fn()
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = clock()
            for _ in range(calls):
                fn()
            sync()
            best[i] = min(best[i], (clock() - start) / calls)
    return [t * 1e6 for t in best]


def _us(t: float) -> str:
    return "-" if t != t else f"{t:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    if gpukernels.triton is None:
        sys.exit("Triton is not installed: the GPU path does not exist here")
    launches: list = []
    kernels = (gpukernels.quantize_kernel, gpukernels.igemm_kernel)
    if device.type == "cpu":  # the GPU path on CPU tensors, as intexec.forward takes it on a GPU, without launches
        gpukernels.quantize_kernel = gpukernels.igemm_kernel = NoLaunch()
        intexec.forward = lambda layer, x: gpuexec.gpu_forward(layer, x) if intexec._ready(layer, x) else None
    elif not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA GPU here")
    rows = []
    for name, (make, shape) in LAYERS.items():
        torch.manual_seed(0)
        module = make()
        layer = frozen_layer(copy.deepcopy(module)).to(device)
        half = module.to(device, torch.bfloat16)
        x = torch.randn(shape, device=device, dtype=torch.bfloat16)
        if gpuexec.gpu_plan(layer) is None:
            raise RuntimeError(f"{name}: the GPU kernels do not serve this layer ({gpuexec.gpu_support(layer)})")

        def rebuilt():
            gpuexec.drop_gpu_plan(layer)
            return layer(x)

        bind = None
        if device.type == "cpu":  # record this call's two launches, to time Triton's binding of them
            launches.clear()
            gpukernels.quantize_kernel, gpukernels.igemm_kernel = (NoLaunch(k, launches) for k in kernels)
            with torch.no_grad():
                layer(x)
            gpukernels.quantize_kernel = gpukernels.igemm_kernel = NoLaunch()
            bind = binding(launches)
        columns = [lambda: layer(x), rebuilt, (lambda: half(x)) if device.type == "cuda" else None, bind]
        with torch.no_grad():
            timed = iter(per_call_us([f for f in columns if f is not None], args.calls, device, args.rounds))
        times = [float("nan") if f is None else next(timed) for f in columns]  # a column not timed here: "-"
        rows.append((name, *times))
        print(f"{name}: plan {times[0]:.1f} us, rebuilt {times[1]:.1f} us, float {times[2]:.1f} us, Triton's "
              f"binding {times[3]:.1f} us", flush=True)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else "CPU, Triton launches replaced by no-ops")
    lines = [f"Command: `{report.command()}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {where}; torch {torch.__version__}, Triton "
             f"{gpukernels.triton.__version__}; one thread; "
             f"{'wall clock' if device.type == 'cuda' else 'process CPU time'}; us per call, the least over "
             f"{args.rounds} rounds of the mean of {args.calls} calls (bfloat16 input of batch 1, 8 positions or "
             "tokens).", "",
             "| layer (W4A4) | plan (as it runs) | plan rebuilt per call | float layer, bf16 | Triton's binding of "
             "the 2 launches (sm_90) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} | {_us(c)} | {_us(d)} |" for name, a, b, c, d in rows]
    report.emit("Host time per quantized layer call on the GPU path", lines, args.output)

if __name__ == "__main__":
    main()
