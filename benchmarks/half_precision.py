"""How far a half-precision load of a calibrated checkpoint moves the denoiser's output, and why.

A W4A4 checkpoint of the embedded digits model (round-to-nearest, the library's default dynamic per-token
activations; ``--reconstruction`` for learned rounding) is saved once, then loaded with ``torch_dtype`` float32,
float16 and bfloat16 and run on the same 8 noisy samples at t=500 (fixed seeds). Rows:

* the full-precision model in half precision against itself in float32 (what the dtype costs a float model);
* the W4A4 model in half precision against its float32 load, fake-quant reference and integer kernels;
* what the dtype explains: the float32 W4A4 model whose quantized layers see their inputs rounded to the half dtype
  first (the same codes a half-precision model computes if nothing else differed), so the difference is the code
  flips that rounding an activation to 8 or 11 significant bits causes, carried through the network;
* the same with each value of every quantized layer's input moved one float32 step up or down at random
  (``nextafter``): how far the smallest possible change to the activations travels through a 4-bit network;
* W4A4 against full precision, both float32: the quantization error itself, for scale.

    python benchmarks/half_precision.py --output docs/results/half_precision.md
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.utils import logging as dlogging

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.quant.convert import quant_layers
from diffusers_gac.zoo import load_embedded_scheduler, load_embedded_unet

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def inputs(model: UNet2DModel, n: int = 8, t: int = 500) -> dict:
    g = torch.Generator().manual_seed(1234)  # evaluation noise, disjoint from calibration's seeds
    cfg = model.config
    call = {"sample": torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
            "timestep": torch.full((n,), t)}
    if getattr(cfg, "num_class_embeds", None):
        call["class_labels"] = torch.arange(n) % cfg.num_class_embeds
    return call


def run(model: UNet2DModel, call: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in call.items()}
    with torch.no_grad():
        return model(**cast).sample.float()


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = a - b
    return d.pow(2).mean().sqrt().item(), d.abs().max().item()


class RoundInputs:
    """Forward pre-hooks rounding every quantized layer's input to ``dtype`` and back to float32 (``None``: moving
    each value one float32 step up or down at random instead, seeded)."""

    def __init__(self, model, dtype):
        g = torch.Generator().manual_seed(0)

        def change(x):
            if dtype is not None:
                return x.to(dtype).float()
            up = torch.rand(x.shape, generator=g) < 0.5
            return torch.nextafter(x, torch.where(up, float("inf"), float("-inf")))

        self.handles = [layer.register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
                        for layer in quant_layers(model).values()]

    def remove(self):
        for h in self.handles:
            h.remove()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reconstruction", default="none", help="GACConfig.reconstruction (default: none, RTN)")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    command = "python benchmarks/half_precision.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    dlogging.set_verbosity_error()
    torch.manual_seed(args.seed)
    fp = load_embedded_unet().eval()
    model = copy.deepcopy(fp)
    config = GACConfig(w_bits=4, a_bits=4, reconstruction=args.reconstruction, seed=args.seed)
    quantize_model(model, config, scheduler=load_embedded_scheduler(), show_progress=False)
    call = inputs(fp)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        diffusers_gac.save_pretrained(model, tmp)
        loaded = {}
        for execution in ("fake", "auto"):
            for name, dtype in [("float32", torch.float32), *DTYPES.items()]:
                m = UNet2DModel.from_pretrained(tmp, torch_dtype=dtype,
                                                quantization_config=GACConfig(execution=execution)).eval()
                loaded[execution, name] = run(m, call, dtype)
    reference = loaded["fake", "float32"]
    fp32_out = run(fp, call)
    for name, dtype in DTYPES.items():
        rows.append((f"full precision, {name} vs float32", *diff(run(copy.deepcopy(fp).to(dtype), call, dtype),
                                                                 fp32_out)))
    for execution in ("fake", "auto"):
        for name in DTYPES:
            rows.append((f"W4A4 {execution}, {name} load vs float32 load",
                         *diff(loaded[execution, name], loaded[execution, "float32"])))
    rows.append(("W4A4 auto vs fake, float32 loads", *diff(loaded["auto", "float32"], reference)))
    plain = run(model, call)
    for name, dtype in DTYPES.items():
        hooks = RoundInputs(model, dtype)
        rounded = run(model, call)
        hooks.remove()
        rows.append((f"W4A4 float32, quantized layers' inputs rounded to {name} (what the dtype explains)",
                     *diff(rounded, plain)))
    hooks = RoundInputs(model, None)
    rows.append(("W4A4 float32, quantized layers' inputs moved one float32 step up or down at random", *diff(run(model, call), plain)))
    hooks.remove()
    rows.append(("W4A4 vs full precision, float32", *diff(reference, fp32_out)))
    lines = ["# Half-precision loads of a W4A4 checkpoint (embedded digits model)", "",
             f"Command: `{command}`", "", f"torch {torch.__version__}, CPU; 8 samples at t=500, output of the "
             f"denoiser (noise prediction); reconstruction={args.reconstruction!r}, calibration seed {args.seed}.", "",
             "| comparison | RMS | max |", "|---|---|---|"]
    lines += [f"| {label} | {rms:.4f} | {mx:.4f} |" for label, rms, mx in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
