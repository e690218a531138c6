"""The ``calibrate`` subcommand and the job behind it: quantize, evaluate, write one folder atomically."""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from torch import nn

from .. import zoo
from ..api import quantize_model
from ..calibration.plots import plot_calibration
from ..config import ACT_SCHEMES, LOWRANK_BITS, RECONSTRUCTIONS, TIMESTEP_SELECTIONS, WEIGHTINGS, GACConfig
from ..evaluation import EvalResult, evaluate_denoiser, evaluation_seed, image_grid, sample_images, summarize
from ..evaluation.evaluate import score_samples
from ..saving import replace_folder_atomically, write_checkpoint
from .common import (CLIError, bits, check_writable, default_device, format_table, model_ref, optional_bits,
                     positive_int, seed)


def add_calibrate_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    defaults = GACConfig()
    p = subparsers.add_parser(
        "calibrate", parents=parents, help="quantize and calibrate a model, then evaluate it",
        description="Quantize a model (default: the embedded digits model), calibrate it on its own sampling "
        "trajectories, evaluate it against the full-precision model and write model, samples and report.",
    )
    p.add_argument("--model", type=model_ref, default=zoo.DEFAULT_MODEL, help="embedded name or model folder (default: digits)")
    p.add_argument("--output", type=Path, required=True, help="folder to write (must not exist, or be empty)")
    p.add_argument("--w-bits", type=bits, default=defaults.w_bits, help=f"weight bits, 2-8 (default: {defaults.w_bits})")
    p.add_argument("--a-bits", type=optional_bits, default=defaults.a_bits, help=f"activation bits, 2-8 or none (default: {defaults.a_bits})")
    p.add_argument("--act-scheme", choices=ACT_SCHEMES, default=defaults.act_scheme, help=f"activation ranges (default: {defaults.act_scheme})")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=None,
                   help=f"calibration sample weighting (default: {defaults.weighting}; uniform with --reconstruction none or "
                        "--act-scheme static)")
    p.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default=defaults.reconstruction,
                   help=f"adaround, or none for round-to-nearest (default: {defaults.reconstruction})")
    p.add_argument("--timesteps", choices=TIMESTEP_SELECTIONS, default=defaults.calib_timestep_selection,
                   help=f"calibration timestep selection (default: {defaults.calib_timestep_selection})")
    p.add_argument("--iters", type=positive_int, default=defaults.iters, help=f"optimisation steps per block (default: {defaults.iters})")
    p.add_argument("--seed", type=seed, default=defaults.seed, help=f"calibration seed; the evaluation uses seed + 1000 (default: {defaults.seed})")
    p.add_argument("--eval-samples", type=int, default=500, help="samples for the evaluation in the report; 0 skips it (default: 500)")
    levers = p.add_argument_group("activation-side levers (docs/levers.md; off by default)")
    levers.add_argument("--act-group-size", type=positive_int, default=None, help="dynamic ranges per group of this many input channels")
    levers.add_argument("--act-clipping", action="store_true", help="shrink dynamic ranges by a searched per-layer ratio")
    levers.add_argument("--smoothing", action="store_true", help="move input-channel scales into the weights (searched)")
    levers.add_argument("--lowrank-rank", type=rank, default=0, help="rank (or fraction in (0, 1)) of a low-rank float branch")
    levers.add_argument("--lowrank-bits", type=int, choices=LOWRANK_BITS, default=defaults.lowrank_bits,
                        help=f"storage of the branch's factors: 16 (float16) or 8 (int8 codes) (default: {defaults.lowrank_bits})")
    p.set_defaults(func=run_calibrate)


def rank(text: str) -> int | float:
    """argparse type of --lowrank-rank: an integer >= 0, or a fraction in (0, 1)."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 or a fraction in (0, 1), got {text!r}") from None
    if not (isinstance(value, int) and value >= 0 or isinstance(value, float) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 or a fraction in (0, 1), got {text!r}")
    return value


def run_calibrate(args: argparse.Namespace) -> int:
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise CLIError(f"--output {args.output} already exists and is not empty; choose a new folder")
    if args.eval_samples < 0:
        raise CLIError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    check_writable(args.output, "--output")
    config = GACConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, act_scheme=args.act_scheme, weighting=args.weighting,
        reconstruction=args.reconstruction, calib_timestep_selection=args.timesteps, iters=args.iters,
        seed=args.seed, calib_num_inference_steps=args.steps,
        calib_num_timesteps=min(GACConfig.calib_num_timesteps, args.steps), act_group_size=args.act_group_size,
        act_clipping=args.act_clipping, smoothing=args.smoothing, lowrank_rank=args.lowrank_rank,
        lowrank_bits=args.lowrank_bits,
    )
    device = args.device or default_device()
    fp_unet, scheduler = zoo.load_model(args.model, device=device)
    result = calibrate_and_save(fp_unet, scheduler, config, args.output, eval_samples=args.eval_samples,
                                num_inference_steps=args.steps, batch_size=args.batch_size, show_progress=not args.quiet)
    if "evaluation" in result:
        e = result["evaluation"]
        print(format_table([{"model": "full precision", **e["full_precision"]}, {"model": str(args.output), **e["quantized"]}]))
    print(f"wrote {args.output}")
    return 0


def calibrate_and_save(
    fp_denoiser: nn.Module,
    scheduler,
    config: GACConfig,
    output: str | Path,
    *,
    eval_samples: int = 500,
    num_inference_steps: int = 25,
    batch_size: int = 256,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The main job: quantize a copy of ``fp_denoiser``, evaluate it against the original and write
    ``output/{unet,scheduler}`` (a folder ``diffusers_gac.zoo.load_model`` and ``from_pretrained`` read),
    ``samples.png``, ``report.json`` and ``diagnostics.png`` (gradient conflict and learned weights per unit).
    The folder appears complete or not at all."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not empty")
    denoiser = copy.deepcopy(fp_denoiser)
    report = quantize_model(denoiser, config, scheduler=scheduler, show_progress=show_progress)
    result: dict[str, Any] = {"calibration": report.to_dict()}
    # evaluation noise disjoint from the calibration trajectories' noise
    sampling = dict(num_inference_steps=num_inference_steps, seed=evaluation_seed(config.seed), batch_size=batch_size,
                    show_progress=show_progress)
    if eval_samples > 0:
        start = time.perf_counter()
        reference, labels = sample_images(fp_denoiser, scheduler, eval_samples, **sampling)
        fp_eval = EvalResult(**score_samples(reference, labels, reference_images=reference, batch_size=batch_size),
                             num_samples=eval_samples, num_inference_steps=num_inference_steps, seed=sampling["seed"],
                             scheduler=type(scheduler).__name__,
                             sampling_seconds=round(time.perf_counter() - start, 3))
        q_eval = evaluate_denoiser(denoiser, scheduler, reference_images=reference, num_samples=eval_samples, **sampling)
        result["evaluation"] = {"full_precision": summarize([fp_eval]), "quantized": summarize([q_eval])}
        denoiser.hf_quantizer.calibration_report["evaluation"] = result["evaluation"]  # the model card shows it
    grid_images, _ = sample_images(denoiser, scheduler, 100, num_inference_steps=num_inference_steps, seed=sampling["seed"],
                                   show_progress=False)

    def write(folder: Path) -> None:
        write_checkpoint(denoiser, folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")
        image_grid(grid_images, nrow=10).save(folder / "samples.png")
        if config.reconstruction != "none":
            plot_calibration(result["calibration"]["units"], folder / "diagnostics.png")
        (folder / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    replace_folder_atomically(output, write)
    return result
