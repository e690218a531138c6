"""What freezing's float16 rounding (the quantized layers' biases, weight scales and static input scales) costs in
quality, isolated from everything else.

Per seed: one calibration of the embedded model (the calibration flow's own steps: record, convert, reconstruct),
then the same calibrated state frozen twice, with the float16 rounding (what calibration does) and without it
(``freeze_model(..., float16=False)``: float32 values, as before the rounding). Both frozen models share their
integer codes and differ only by the rounding. Each is scored against full precision on the same noise as
``ptq_compare.py`` scores a run: trajectory MSE (noise-prediction error along the full-precision trajectories), PSNR
and MSE of the samples against the full-precision samples, FD against held-out real images. One torch thread.

    python benchmarks/float16_rounding.py --method gac --seeds 0 1 2 --output docs/results/float16_rounding.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as dlogging
from ptq_compare import METHODS, method_options, parse_bits, parse_value

from diffusers_gac import GACConfig, record_calibration_data, zoo
from diffusers_gac.calibration.reconstruction import make_weighting, reconstruct_model
from diffusers_gac.evaluation import evaluate_denoiser, evaluation_seed, sample_images, trajectory_error
from diffusers_gac.quant.convert import convert_model, freeze_model

VARIANTS = {"float32 values": False, "float16 values (default)": True}


def calibrated_pair(fp: torch.nn.Module, scheduler, config: GACConfig) -> dict[str, torch.nn.Module]:
    """One calibration of a copy of ``fp``, frozen without and with the float16 rounding."""
    data = record_calibration_data(fp, config, scheduler=scheduler, show_progress=False)
    model = copy.deepcopy(fp)
    convert_model(model, config)
    reconstruct_model(model, data, config, weighting=make_weighting(config), show_progress=False)
    pair = {name: copy.deepcopy(model) for name in VARIANTS}
    for name, float16 in VARIANTS.items():
        freeze_model(pair[name], config.execution, float16=float16)
    return pair


def score(model, fp, scheduler, reference, features, real, seed: int, args) -> dict[str, float]:
    result = evaluate_denoiser(model, scheduler, reference_images=reference, num_samples=args.num_samples, seed=seed,
                               num_inference_steps=args.steps, classifier=features, real_images=real,
                               show_progress=False)
    mse = trajectory_error(model, fp, scheduler, args.trajectory_samples, num_inference_steps=args.steps,
                           seed=seed)["mse"]
    return {"trajectory_mse": mse, "psnr": result.psnr, "mse": result.mse, "fd": result.fd}


def _cell(values: list[float], digits: int, scale: float = 1.0) -> str:
    v = np.array(values) * scale
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


def table(rows: list[dict], command: str) -> str:
    lines = ["| frozen with | seeds | trajectory MSE (x1e-3) ↓ | PSNR vs FP (dB) ↑ | sample MSE (x1e-3) ↓ | FD ↓ |",
             "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        rs = [r[name] for r in rows]
        lines.append(f"| {name} | {len(rs)} | {_cell([r['trajectory_mse'] for r in rs], 4, 1e3)} | "
                     f"{_cell([r['psnr'] for r in rs], 3)} | {_cell([r['mse'] for r in rs], 4, 1e3)} | "
                     f"{_cell([r['fd'] for r in rs], 3)} |")
    diffs = [r["float16 values (default)"]["trajectory_mse"] / r["float32 values"]["trajectory_mse"] - 1 for r in rows]
    lines += ["", "Trajectory MSE with float16 values relative to float32 values, per seed: "
              + ", ".join(f"{d:+.3%}" for d in diffs) + ".", "", "Command:", "", "```", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="embedded model (digits or photos)")
    p.add_argument("--bits", default="W4A4", type=parse_bits)
    p.add_argument("--method", default="gac", choices=list(METHODS), help="calibration method (as in ptq_compare.py)")
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="further GACConfig options")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the evaluation and the calibration data")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--trajectory-samples", type=int, default=256)
    p.add_argument("--output", type=Path, default=None, help="markdown file to write (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dlogging.set_verbosity_error()
    fp = zoo.load_embedded_unet(args.model)
    scheduler = zoo.load_embedded_scheduler(args.model)
    features, real = zoo.load_feature_network(args.model), zoo.load_real_images(args.model, "test")
    options = {**args.bits, "calib_num_inference_steps": args.steps, **method_options(args.method),
               **{k: parse_value(v) for k, _, v in (item.partition("=") for item in args.set)}}
    rows = []
    for seed in args.seeds:
        eval_seed = evaluation_seed(seed)  # noise disjoint from the calibration trajectories'
        reference, _ = sample_images(fp, scheduler, args.num_samples, num_inference_steps=args.steps, seed=eval_seed,
                                     show_progress=False)
        pair = calibrated_pair(fp, scheduler, GACConfig(**options, seed=seed))
        rows.append({name: score(model, fp, scheduler, reference, features, real, eval_seed, args)
                     for name, model in pair.items()})
        print(json.dumps({"seed": seed, **rows[-1]}), file=sys.stderr)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = table(rows, command)
    print(text)
    if args.output:
        args.output.write_text(
            f"# What float16 scales and biases cost\n\n{args.model}, {' '.join(f'{k}={v}' for k, v in options.items())}; "
            f"{args.num_samples} samples and {args.trajectory_samples} trajectories of DDIM {args.steps} per seed, "
            "one torch thread, evaluation noise from seed + 1000. The same calibration per seed, frozen with float32 "
            "values and with float16 values (benchmarks/float16_rounding.py).\n\n" + text)


if __name__ == "__main__":
    main()
