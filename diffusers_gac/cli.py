"""The ``diffusers-gac`` command. Each subcommand only parses its arguments and calls the library.

    diffusers-gac calibrate --w-bits 4 --a-bits 4 --output outputs/digits-w4a4
    diffusers-gac sample --model digits --output samples.png --num-samples 100 --steps 25
    diffusers-gac evaluate path/to/quantized --reference digits --num-samples 1000 --seeds 0 1 2 --json
    diffusers-gac push outputs/digits-w4a4 my-org/digits-w4a4

A model is an embedded name (``digits``) or a folder: a diffusers model folder (``config.json``) or one with
``unet/`` and optionally ``scheduler/`` subfolders (see :func:`diffusers_gac.zoo.load_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers.utils import logging as dlogging

from . import zoo
from .config import ACT_SCHEMES, RECONSTRUCTIONS, TIMESTEP_SELECTIONS, WEIGHTINGS, GACConfig
from .api import calibrate_and_save
from .data import load_digits_split
from .evaluation import (
    evaluate_denoiser,
    format_mean_std,
    image_grid,
    num_class_labels,
    sample_images,
    summarize,
)

logger = dlogging.get_logger(__name__)

MIN_BITS, MAX_BITS = 2, 8


class CLIError(Exception):
    """A bad command line found after parsing; reported like an argparse error (exit code 2)."""


# -- argument types ---------------------------------------------------------------------------------------------


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {number}")
    return number


def bits(value: str) -> int:
    """Bit width for ``--w-bits`` / ``--a-bits``: an integer from 2 to 8."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer bit width, got {value!r}") from None
    if not MIN_BITS <= number <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"bit width must be between {MIN_BITS} and {MAX_BITS}, got {number}")
    return number


def model_ref(value: str) -> str:
    """An embedded model name or a model folder; checked now so a typo fails before anything is loaded."""
    try:
        zoo.resolve_model_path(value)
    except (FileNotFoundError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _sampling_options() -> argparse.ArgumentParser:
    """Options every sampling subcommand shares."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--steps", type=positive_int, default=25, help="DDIM inference steps (default: 25)")
    parent.add_argument("--batch-size", type=positive_int, default=256, help="samples per forward pass (default: 256)")
    parent.add_argument("--device", default=None, help="torch device (default: cuda, then mps, then cpu)")
    parent.add_argument("--quiet", action="store_true", help="no progress bars")
    return parent


# -- sample -----------------------------------------------------------------------------------------------------


def add_sample_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "sample", parents=parents, help="sample a model into a PNG grid", description="Sample a model into a PNG grid."
    )
    p.add_argument("--model", type=model_ref, default=zoo.DEFAULT_MODEL, help="embedded name or model folder (default: digits)")
    p.add_argument("--output", type=Path, default=Path("samples.png"), help="PNG file to write (default: samples.png)")
    p.add_argument("--num-samples", type=positive_int, default=100, help="number of images (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--class-label", type=int, default=None, help="one class for all samples (default: all classes in turn)")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    unet, scheduler = zoo.load_model(args.model, device=device)
    num_classes = num_class_labels(unet)
    if args.class_label is not None:
        if num_classes is None:
            raise CLIError(f"--class-label {args.class_label} given but model {args.model!r} is unconditional")
        if not 0 <= args.class_label < num_classes:
            raise CLIError(f"--class-label must be between 0 and {num_classes - 1}, got {args.class_label}")
    images, _ = sample_images(
        unet,
        scheduler,
        args.num_samples,
        class_labels=args.class_label,
        num_inference_steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        show_progress=not args.quiet,
    )
    # With balanced labels and a row per num_classes images, each column holds one class.
    nrow = num_classes if num_classes and args.class_label is None and args.num_samples >= num_classes else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=nrow).save(args.output)
    logger.info(f"wrote {args.num_samples} samples of {args.model} to {args.output}")
    print(args.output)
    return 0


# -- evaluate ---------------------------------------------------------------------------------------------------


def add_evaluate_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "evaluate",
        parents=parents,
        help="FD, PSNR and accuracy of models against a reference",
        description=(
            "Sample each model with the reference's scheduler and score it: FD of digits-classifier features vs "
            "the held-out test digits, PSNR vs the reference's samples from the same noise, and the accuracy of "
            "the classifier on the requested labels. PSNR is inf for identical samples."
        ),
    )
    p.add_argument("models", nargs="*", type=model_ref, help="model folders or embedded names (default: the reference itself)")
    p.add_argument("--reference", type=model_ref, default=zoo.DEFAULT_MODEL, help="full-precision model (default: digits)")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="samples per seed (default: 1000)")
    p.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0], help="one or more seeds (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object per model and line")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    show_progress = not args.quiet
    reference_unet, scheduler = zoo.load_model(args.reference, device=device)
    reference_path = zoo.resolve_model_path(args.reference).resolve()
    classifier = zoo.load_digits_classifier()
    real_images, _ = load_digits_split("test")
    sampling = dict(num_inference_steps=args.steps, batch_size=args.batch_size, show_progress=show_progress)
    reference_samples: dict[int, torch.Tensor] = {}  # seed -> samples, shared by all models

    rows = []
    for model in args.models or [args.reference]:
        is_reference = zoo.resolve_model_path(model).resolve() == reference_path
        unet = reference_unet if is_reference else zoo.load_model(model, device=device)[0]
        runs = []
        for seed in args.seeds:
            if not is_reference and seed not in reference_samples:
                reference_samples[seed], _ = sample_images(reference_unet, scheduler, args.num_samples, seed=seed, **sampling)
            runs.append(
                evaluate_denoiser(
                    unet,
                    scheduler,
                    reference_unet=reference_unet if is_reference else None,
                    reference_images=None if is_reference else reference_samples[seed],
                    num_samples=args.num_samples,
                    seed=seed,
                    classifier=classifier,
                    real_images=real_images,
                    **sampling,
                )
            )
        row = {"model": model, **summarize(runs), "runs": [r.to_dict() for r in runs]}
        rows.append(row)
        if args.json:
            # Python's json writes an infinite PSNR as Infinity, which json.loads reads back.
            print(json.dumps(row), flush=True)
    if not args.json:
        print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`run_evaluate` rows (mean ± std over seeds)."""
    header = ["model", "steps", "samples", "seeds", "FD", "PSNR (dB)", "accuracy"]
    body = [
        [
            r["model"],
            str(r["num_inference_steps"]),
            str(r["num_samples"]),
            ",".join(map(str, r["seeds"])),
            format_mean_std(r["fd"], r["fd_std"]),
            format_mean_std(r["psnr"], r["psnr_std"]),
            format_mean_std(r["accuracy"], r["accuracy_std"], digits=4),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- calibrate --------------------------------------------------------------------------------------------------


def optional_bits(value: str) -> int | None:
    """``--a-bits``: a bit width, or ``none`` to keep activations in full precision."""
    return None if value.lower() in ("none", "fp", "32") else bits(value)


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
    p.add_argument("--weighting", choices=WEIGHTINGS, default=defaults.weighting, help=f"calibration sample weighting (default: {defaults.weighting})")
    p.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default=defaults.reconstruction,
                   help=f"adaround, or none for round-to-nearest (default: {defaults.reconstruction})")
    p.add_argument("--timesteps", choices=TIMESTEP_SELECTIONS, default=defaults.calib_timestep_selection,
                   help=f"calibration timestep selection (default: {defaults.calib_timestep_selection})")
    p.add_argument("--iters", type=positive_int, default=defaults.iters, help=f"optimisation steps per block (default: {defaults.iters})")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of calibration and evaluation (default: {defaults.seed})")
    p.add_argument("--eval-samples", type=int, default=500, help="samples for the evaluation in the report; 0 skips it (default: 500)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise CLIError(f"--output {args.output} already exists and is not empty; choose a new folder")
    if args.eval_samples < 0:
        raise CLIError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    config = GACConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, act_scheme=args.act_scheme, weighting=args.weighting,
        reconstruction=args.reconstruction, calib_timestep_selection=args.timesteps, iters=args.iters,
        seed=args.seed, calib_num_inference_steps=args.steps,
        calib_num_timesteps=min(GACConfig.calib_num_timesteps, args.steps),
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


# -- push -------------------------------------------------------------------------------------------------------


def add_push_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="upload a calibrated model with its generated model card to the Hub",
        description="Upload a calibrated model (a `calibrate` output folder or a saved quantized model) to the Hugging "
        "Face Hub with a generated model card: bits, calibration settings, the measured quality from report.json "
        "and the learned-weights plot.",
    )
    p.add_argument("model", type=Path, help="a `calibrate` output folder, or a quantized model folder")
    p.add_argument("repo_id", help="the Hub repository, e.g. my-org/digits-w4a4")
    p.add_argument("--base-model", default=None, help="the full-precision model's Hub id, for the card's metadata")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", type=Path, default=None, metavar="DIR",
                   help="write what would be uploaded into DIR instead of uploading")
    p.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub, quantized_components, write_hub_folder

    if not args.model.is_dir():
        raise CLIError(f"model {args.model} is not a folder")
    unet, _ = zoo.load_model(args.model)
    if not quantized_components(unet):
        raise CLIError(f"{args.model} holds a full-precision model; run `diffusers-gac calibrate` first")
    evaluation = None
    report_file = args.model / "report.json"
    if report_file.is_file():  # written by `calibrate`: calibration report and evaluation
        report = json.loads(report_file.read_text())
        unet._gac_calibration_report = report.get("calibration")
        evaluation = report.get("evaluation")
    if args.dry_run is not None:
        if args.dry_run.exists() and any(args.dry_run.iterdir()):
            raise CLIError(f"--dry-run {args.dry_run} already exists and is not empty")
        write_hub_folder(unet, args.dry_run, repo_id=args.repo_id, evaluation=evaluation, base_model=args.base_model)
        print(f"wrote {args.dry_run} (nothing uploaded)")
        return 0
    commit = push_to_hub(unet, args.repo_id, evaluation=evaluation, base_model=args.base_model,
                         private=args.private or None)
    print(f"pushed {args.model} to {args.repo_id}: {commit}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-gac", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (diffusers info level)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sampling = _sampling_options()
    add_sample_parser(subparsers, [sampling])
    add_evaluate_parser(subparsers, [sampling])
    add_calibrate_parser(subparsers, [sampling])
    add_push_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        dlogging.set_verbosity_info()
    try:
        return args.func(args)
    except CLIError as err:
        parser.error(f"{args.command}: {err}")


if __name__ == "__main__":
    sys.exit(main())
