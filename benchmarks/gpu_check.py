"""Checks of the GPU integer kernels on a real GPU (the test suite runs the same kernels on CPU tensors through
Triton's interpreter; this script is for a machine with a CUDA GPU, and exits early without one).

1. Layer by layer, the Triton kernels (``execution="integer"``) against the fake-quant reference on the GPU, for
   convolutions (3x3 padded, strided, 1x1, split inputs) and linear layers at W8A8/W4A8/W4A4 with dynamic and static
   ranges, in float32 (within 1e-5 of the output's scale, as the CPU kernels) and bfloat16 (inputs and outputs;
   within bfloat16's rounding of the output).
2. The weight storages (``int4_storage``): 4-bit weights resident as int8 or float8 carriers give outputs
   bit-identical to packed ones, float8 ones multiplied on float8 tensor cores where the GPU has them (W4A4), on
   layers whose sums are as large as 4-bit codes make them (every product 15 * 15, up to 5120 channels): what makes
   float8 exact is that the tensor cores' partial sums are added into float32 every 32 channels.
3. The dense path of ``"auto"`` layers (``gpuexec.dense_run``: the input fake-quantized and the weight dequantized by
   Triton kernels, then PyTorch's conv/linear) against the reference on the GPU, float32 and bfloat16: the same
   values reach the same dense op, so the outputs should be bit-identical (grouped convolutions, clipped and
   per-group ranges included); the float8 path (``gpuexec.scaled_run``, ``torch._scaled_mm``) against the integer
   kernels in bfloat16 (the same sums of the same codes: within one bfloat16 rounding); and what ``"auto"``
   chooses, timing the paths that serve each layer, on SD-sized layers.
4. The SD-1.5-sized UNet (random weights) at W4A4: the integer model against the fake-quant one on the GPU.
5. Channels-last layers (``model.to(memory_format=torch.channels_last)``): a channels-last input gives a
   channels-last output with the same values on every path, and so does a layer moved to channels-last.
6. With two GPUs or more, layers on ``cuda:1`` while ``cuda:0`` is current (a pipeline spread over GPUs): every path
   gives what it gives on ``cuda:0`` (Triton launches on the current device unless the paths switch to the input's).
7. A sweep of the implicit GEMM's tile configurations on SD's layers at latent 128, batch 2, against bfloat16
   ``F.conv2d``/``F.linear``.

    python benchmarks/gpu_check.py [--skip-unet] [--skip-sweep]
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from diffusers_gac import GACConfig
from diffusers_gac.quant import gpuauto, gpuexec, gpukernels, intexec
from diffusers_gac.quant.convert import convert_model, freeze_model, set_execution
from diffusers_gac.quant.layers import QuantConv2d, QuantLinear
from diffusers_gac.quant.quantizers import SplitActQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import model_inputs, sd_unet, to_half  # noqa: E402


def frozen(module: nn.Module, x: torch.Tensor, w_bits: int, a_bits: int, scheme: str, split: int | None = None,
           **levers):
    """``levers``: ``group_size`` and ``clipping`` (then every range is clipped to 0.7 of itself)."""
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    layer = cls.from_module(module, w_bits=w_bits, a_bits=a_bits, weight_init="minmax", act_scheme=scheme,
                            split=split, **levers)
    q = layer.input_quantizer
    qs = [q.first, q.second] if isinstance(q, SplitActQuantizer) else [q]
    for p in qs:
        p.start_observing()
    layer(x)
    for p in qs:
        p.finish_observing()
    layer.freeze()
    for p in qs:
        if p.clip is not None:
            p.clip.fill_(0.7)
    return layer


def check_layers(device: str) -> int:
    """Each layer's Triton output against the fake-quant reference computed on the CPU in float32 (a GPU's float32
    convolutions may run in TF32), from the same inputs (a bfloat16 input's values, upcast)."""
    failures = 0
    cases = {
        "conv 3x3 pad": (lambda: nn.Conv2d(96, 80, 3, padding=1), (2, 96, 17, 19), None),
        "conv 3x3 stride 2": (lambda: nn.Conv2d(64, 48, 3, stride=2, padding=1), (2, 64, 16, 16), None),
        "conv 1x1": (lambda: nn.Conv2d(160, 64, 1), (3, 160, 9, 9), None),
        "conv 3x3 split": (lambda: nn.Conv2d(128, 64, 3, padding=1), (2, 128, 12, 12), 80),
        "conv 1x1 split odd": (lambda: nn.Conv2d(99, 32, 1, bias=False), (1, 99, 8, 8), 33),
        "linear": (lambda: nn.Linear(320, 640), (2, 77, 320), None),
        "linear odd K": (lambda: nn.Linear(75, 40), (5, 75), None),
    }
    settings = [(8, 8, "dynamic"), (4, 4, "dynamic"), (4, 8, "dynamic"), (4, 4, "static"), (8, 8, "static")]
    for w_bits, a_bits, scheme in settings:
        for name, (make, shape, split) in cases.items():
            if scheme == "static" and name not in ("conv 3x3 split", "linear"):
                continue
            torch.manual_seed(0)
            x = torch.randn(shape) + 0.3
            layer = frozen(make(), x, w_bits, a_bits, scheme, split)
            xh = x.bfloat16()
            with torch.no_grad():
                ref = layer(x)
                ref_half = layer(xh.float())  # the codes a bfloat16 input gets, summed in float32
                gpu = copy.deepcopy(layer).to(device)
                assert gpu.set_execution("integer") and gpu.execution == "integer", name
                out = gpu(x.to(device)).cpu()
                out_half = gpu(xh.to(device)).cpu()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            # bfloat16 output: one rounding, 2**-9 of each value
            err_half = ((out_half.float() - ref_half).abs() / ref_half.abs().clamp_min(1e-3 * ref_half.abs().max())
                        ).max().item()
            ok = err <= 1e-5 and err_half <= 2 ** -7 and out_half.dtype == torch.bfloat16
            failures += not ok
            print(f"W{w_bits}A{a_bits} {scheme:8s} {name:20s} fp32 err {err:.1e}  bf16 err {err_half:.1e} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    return failures


def check_storages(device: str) -> int:
    """4-bit weights kept as int8 or float8 carriers against packed ones: bit-identical outputs (every sum exact)."""
    failures = 0
    cases = {
        "conv 3x3 320": (lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 24, 24), False),
        "linear 1280": (lambda: nn.Linear(1280, 640), (2, 77, 1280), False),
        # one-signed weights and inputs: zero points 0, carriers up to 15, sums up to 225 * 5120
        "linear 5120, largest sums": (lambda: nn.Linear(5120, 256), (2, 64, 5120), True),
    }
    for (w_bits, a_bits), (name, (make, shape, largest)) in [(b, c) for b in ((4, 4), (4, 8)) for c in cases.items()]:
        torch.manual_seed(0)
        module = make()
        x = torch.randn(shape)
        if largest:
            module.weight.data.uniform_(0.5, 1.0)
            x = x.abs() + 1.0
        layer = frozen(module, x, w_bits, a_bits, "dynamic").to(device)
        outs, fp8 = {}, False
        for storage in ("packed", "int8", "fp8"):
            assert layer.set_execution("integer", storage), name
            with torch.no_grad():
                outs[storage] = [layer(x.to(device)).cpu(), layer(x.to(device).bfloat16()).cpu()]
            fp8 = fp8 or (device != "cpu" and gpuexec.fp8_carriers(layer))
        ok = all(torch.equal(a, b) for s in ("int8", "fp8") for a, b in zip(outs[s], outs["packed"]))
        failures += not ok
        print(f"W{w_bits}A{a_bits} {name:26s} int8 and fp8 storage == packed (float32, bfloat16): {ok}; float8 tensor "
              f"cores: {fp8} {'ok' if ok else 'FAIL'}", flush=True)
    return failures


def check_layouts(device: str) -> int:
    """Channels-last (diffusers' ``unet.to(memory_format=torch.channels_last)``): on every path that serves a layer,
    a channels-last bfloat16 input gives a channels-last output with the channels-first call's values, bit for bit,
    and a layer moved to channels-last answers a channels-first input in channels-last."""
    failures = 0
    cases = {"conv 3x3 320": (lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 24, 24)),
             "conv 1x1 320 -> 640": (lambda: nn.Conv2d(320, 640, 1), (2, 320, 24, 24))}
    for name, (make, shape) in cases.items():
        torch.manual_seed(0)
        x = torch.randn(shape) + 0.3
        layer = frozen(make(), x, 4, 4, "dynamic").to(device)
        assert layer.set_execution("integer"), name
        first = x.to(device, torch.bfloat16)
        last = first.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            calls, calls_last = gpuexec.path_calls(layer, first), gpuexec.path_calls(layer, last)
            for path in calls:
                out, out_last = gpuexec.PATHS[path](*calls[path]), gpuexec.PATHS[path](*calls_last[path])
                # the dense path's convolution is the library's, whose channels-last kernels may sum in another order
                same = torch.equal(out, out_last) if path != "dense" else (
                    (out_last.float() - out.float()).abs().max() <= 2 ** -7 * out.float().abs().max())
                ok = out_last.is_contiguous(memory_format=torch.channels_last) and bool(same)
                failures += not ok
                print(f"{name:20s} {path:8s} channels-last input: channels-last output, same values "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
            layer.to(memory_format=torch.channels_last)
            moved = layer(first)
            ok = moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, layer(last))
            failures += not ok
            print(f"{name:20s} moved to channels-last: channels-last output {'ok' if ok else 'FAIL'}", flush=True)
    return failures


def check_dense(device: str) -> int:
    """The dense path against the reference, both on the GPU (same inputs to the same dense op: bit-identical
    expected; within the dtype's rounding accepted), then ``"auto"``'s timed choice on SD-sized layers."""
    if device != "cuda":
        print("the dense path runs on CUDA GPUs only: nothing to check here")
        return 0
    failures = 0
    cases = {
        "conv 3x3 pad": (lambda: nn.Conv2d(96, 80, 3, padding=1), (2, 96, 17, 19), None),
        "conv 3x3 split": (lambda: nn.Conv2d(128, 64, 3, padding=1), (2, 128, 12, 12), 80),
        "linear odd K": (lambda: nn.Linear(75, 40), (5, 7, 75), None),
        "conv 3x3 split, clipped ranges per group of 16": (lambda: nn.Conv2d(128, 64, 3, padding=1), (2, 128, 12, 12),
                                                            80),
        "linear, clipped ranges": (lambda: nn.Linear(320, 64), (2, 77, 320), None),
        "conv 3x3 grouped (8)": (lambda: nn.Conv2d(128, 64, 3, padding=1, groups=8), (2, 128, 12, 12), None),
    }
    for (w_bits, a_bits), (name, (make, shape, split)) in [(b, c) for b in ((4, 4), (8, 8)) for c in cases.items()]:
        torch.manual_seed(0)
        x = torch.randn(shape) + 0.3
        levers = {"group_size": 16 if "per group" in name else None, "clipping": "clipped" in name}
        layer = frozen(make(), x, w_bits, a_bits, "dynamic", split, **levers).to(device)
        results = []
        for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)):
            xd = x.to(device, dtype)
            with torch.no_grad():
                layer.set_execution("fake")
                ref = layer(xd)
                assert layer.set_execution("auto") and gpuauto.pin_path(layer, "dense")
                out = layer(xd)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            results.append((dtype, torch.equal(out, ref), err, err <= bound and out.dtype == dtype))
            if "clipped" in name and "per group" not in name:  # the integer kernels clip too
                with torch.no_grad():
                    gpuauto.pin_path(layer, "integer")
                    out = layer(xd)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                results.append((dtype, "integer", err, err <= (bound if dtype == torch.float32 else 2 ** -6)))
        ok = all(r[3] for r in results)
        failures += not ok
        print(f"W{w_bits}A{a_bits} dense {name:16s} " + "  ".join(
            f"{str(d)[6:]}: {'integer kernels' if same == 'integer' else f'identical {same}'}, err {err:.1e}"
            for d, same, err, _ in results)
            + f" {'ok' if ok else 'FAIL'}", flush=True)
    for name, make, shape in (("linear 320 -> 1280", lambda: nn.Linear(320, 1280), (2, 77, 320)),
                              ("conv 1x1 640 -> 320", lambda: nn.Conv2d(640, 320, 1), (2, 640, 9, 7))):
        for storage in ("packed", "fp8"):
            torch.manual_seed(0)
            x = torch.randn(shape) + 0.3
            layer = frozen(make(), x, 4, 4, "dynamic").to(device)
            layer.bias.data = layer.bias.data.bfloat16()
            xd = x.to(device, torch.bfloat16)
            with torch.no_grad():
                ref = layer(xd)
                assert layer.set_execution("integer", storage)
                integer = layer(xd)
                reason = gpuexec.scaled_support(layer)
                out = None if reason else gpuexec.scaled_run(*gpuexec.path_calls(layer, xd)["scaled"])
            if out is None:
                print(f"W4A4 float8 {name} ({storage}): not served here ({reason})", flush=True)
                continue
            err = ((out.float() - integer.float()).abs().max() / integer.float().abs().max()).item()
            err_ref = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ok = err <= 2 ** -7 and err_ref <= 2 ** -6 and out.dtype == torch.bfloat16
            failures += not ok
            print(f"W4A4 float8 {name} ({storage}): vs integer kernels err {err:.1e}, equal "
                  f"{(out == integer).float().mean().item():.4f}; vs reference err {err_ref:.1e} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    sizes = {"conv 3x3 320 @64": (lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64)),
             "conv 3x3 1280 @16": (lambda: nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 16, 16)),
             "linear 640 -> 5120 @1024": (lambda: nn.Linear(640, 5120), (2, 1024, 640)),
             "linear 320 -> 2560 @16384": (lambda: nn.Linear(320, 2560), (2, 16384, 320))}
    for name, (make, shape) in sizes.items():
        torch.manual_seed(0)
        observed = torch.randn(shape[0], 64, shape[-1]) if len(shape) == 3 else torch.randn(shape)  # dynamic ranges
        layer = frozen(make(), observed, 4, 4, "dynamic").to(device).bfloat16()
        assert layer.set_execution("auto")
        x = torch.randn(shape, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            calls = gpuexec.path_calls(layer, x)
            runs = {p: functools.partial(gpuexec.PATHS[p], *args) for p, args in calls.items()}
            plain = make().to(device).bfloat16()  # the unquantized layer, as bf16 runs it
            seconds = gpuauto.time_paths({**runs, "bf16 layer": lambda: plain(x)}, x.device)
            layer(x)
        print(f"auto W4A4 {name:26s} bf16: " + ", ".join(f"{p} {1e6 * s:.0f} us" for p, s in seconds.items())
              + f"; chose {[p for p, n in gpuauto.chosen_paths(layer).items() if n]}", flush=True)
    return failures


def check_devices(device: str) -> int:
    """Layers on the second GPU while the first is current: each path's output there, bit for bit its output on the
    first GPU (the paths make the input's device current before launching their kernels)."""
    if torch.cuda.device_count() < 2:
        print("one GPU: no second device to check", flush=True)
        return 0
    failures = 0
    for name, make, shape in (("conv 3x3 320", lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 24, 24)),
                              ("linear 320 -> 640", lambda: nn.Linear(320, 640), (2, 77, 320))):
        torch.manual_seed(0)
        x = torch.randn(shape) + 0.3
        layer = frozen(make(), x, 4, 4, "dynamic").to("cuda:0")
        assert layer.set_execution("integer"), name
        with torch.no_grad(), torch.cuda.device(0):
            first = x.to("cuda:0", torch.bfloat16)
            outs = {path: gpuexec.PATHS[path](*call) for path, call in gpuexec.path_calls(layer, first).items()}
            layer.to("cuda:1")
            second = first.to("cuda:1")
            for path, call in gpuexec.path_calls(layer, second).items():
                out = gpuexec.PATHS[path](*call)
                ok = out.device == second.device and torch.equal(out.cpu(), outs[path].cpu())
                failures += not ok
                print(f"{name:20s} {path:8s} on cuda:1, cuda:0 current: {'ok' if ok else 'FAIL'}", flush=True)
    return failures


def check_unet(device: str) -> int:
    """The SD-sized W4A4 UNet at latent 32: integer on the GPU against integer on the CPU (exact int32 sums on both;
    only float rounding differs) and against the fake-quant reference."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    fp = sd_unet((320, 640, 1280, 1280), 768)
    model = copy.deepcopy(fp)
    convert_model(model, GACConfig(w_bits=4, a_bits=4, weight_init="minmax"))
    freeze_model(model, "integer")
    call = model_inputs(fp, 32, 1)
    with torch.no_grad():
        cpu = model(**call).sample
        model.to(device)
        chosen = set_execution(model, "auto")
        print(f"auto on {device}: {len(chosen['integer'])} integer, {len(chosen['fake'])} fake {chosen['fake'][:4]}")
        gcall = {k: v.to(device) for k, v in call.items()}
        out = model(**gcall).sample.cpu()
        set_execution(model, "fake")
        fake = model(**gcall).sample.cpu()
        rel = ((out - cpu).norm() / cpu.norm()).item()
        rel_fake = ((out - fake).norm() / fake.norm()).item()
        print(f"SD-sized W4A4, latent 32: GPU integer vs CPU integer rel L2 {rel:.2e}; vs GPU fake (no TF32) "
              f"{rel_fake:.2e}; fake vs CPU integer {((fake - cpu).norm() / cpu.norm()).item():.2e}", flush=True)
    return 0


def bench(fn, rounds: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / rounds * 1e3


CONFIGS = [(128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 128, 4, 3),
           (256, 128, 64, 8, 3)]


def sweep(device: str) -> None:
    """Tile configurations of the implicit GEMM on SD's layers at latent 128, batch 2 (bfloat16 in and out); ms per
    call; the last line names the configuration with the least total time."""
    G = gpukernels
    layers = [("conv3x3 320 @128", nn.Conv2d(320, 320, 3, padding=1), (2, 320, 128, 128)),
              ("conv3x3 640 @64", nn.Conv2d(640, 640, 3, padding=1), (2, 640, 64, 64)),
              ("conv3x3 1280 @32", nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 32, 32)),
              ("linear 320->2560 x32768", nn.Linear(320, 2560), (2, 16384, 320)),
              ("linear 1280->1280 x2048", nn.Linear(1280, 1280), (2, 1024, 1280))]
    totals = {}
    print("\nsweep: ms per call; bf16 = F.conv2d/F.linear in bfloat16", flush=True)
    for name, module, shape in layers:
        x = torch.randn(shape, device=device)
        xb = x.bfloat16()
        half = copy.deepcopy(module).to(device).bfloat16()
        with torch.no_grad():
            line = [f"{name}: bf16 {bench(lambda: half(xb)):.3f}"]
        for w_bits, a_bits in [(8, 8), (4, 4)]:
            layer = frozen(copy.deepcopy(module).to(device), x[:1], w_bits, a_bits, "dynamic")
            layer.set_execution("integer")
            to_half(layer, torch.bfloat16)
            for cfg in CONFIGS:
                G.CONFIG_OVERRIDE = cfg
                try:
                    with torch.no_grad():
                        ms = bench(lambda: layer(xb))
                except Exception as err:  # a configuration that does not fit (shared memory) is skipped
                    print(f"  {cfg} failed: {type(err).__name__}: {str(err)[:120]}")
                    continue
                totals[(w_bits, cfg)] = totals.get((w_bits, cfg), 0.0) + ms
                line.append(f"W{w_bits}A{a_bits} {cfg} {ms:.3f}")
            G.CONFIG_OVERRIDE = None
            with torch.no_grad():
                line.append(f"W{w_bits}A{a_bits} default {bench(lambda: layer(xb)):.3f}")
                tokens = xb.flatten(2) if xb.dim() == 4 else xb.reshape(2, -1, shape[-1]).transpose(1, 2)
                line.append(f"quantize only {bench(lambda: G.quantize(tokens, 4)):.3f}")
        print(" | ".join(line), flush=True)
    for w_bits in (8, 4):
        best = min((cfg for (w, cfg) in totals if w == w_bits), key=lambda c: totals[(w_bits, c)])
        print(f"BEST W{w_bits} {','.join(map(str, best))} total {totals[(w_bits, best)]:.3f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu checks this script with the CPU kernels")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check (the tests run these kernels on CPU tensors)")
        return
    print(torch.cuda.get_device_name() if device == "cuda" else "cpu", torch.__version__, "kernels available:",
          intexec.integer_kernels_available(device), flush=True)
    failures = 0
    stages = [("layers", check_layers), ("storages", check_storages), ("dense", check_dense),
              ("unet", None if args.skip_unet else check_unet), ("layouts", check_layouts),
              ("devices", check_devices if device == "cuda" else None),
              ("sweep", sweep if device == "cuda" and not args.skip_sweep else None)]
    for name, stage in stages:
        if stage is None:
            continue
        start = time.perf_counter()
        try:
            failures += stage(device) or 0
        except Exception:  # one stage's failure is reported, and the others still run
            traceback.print_exc()
            failures += 1
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
