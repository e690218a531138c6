"""The ``sample``, ``evaluate`` and ``push`` subcommands: each parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers.utils import logging as dlogging
from huggingface_hub import constants as hub_constants

from .. import zoo
from ..evaluation import EVAL_SEED_OFFSET, evaluate_denoiser, refuse_non_finite, image_grid, num_class_labels, sample_images, summarize
from ..hub import push_to_hub, write_hub_folder
from ..saving import quantized_components
from .common import CLIError, check_writable, default_device, format_table, image_file, model_ref, positive_int, repo_id
from .common import seed as seed_type

logger = dlogging.get_logger(__name__)


def add_sample_parser(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "sample", parents=parents, help="sample a model into a PNG grid", description="Sample a model into a PNG grid."
    )
    p.add_argument("--model", type=model_ref, default=zoo.DEFAULT_MODEL, help="embedded name or model folder (default: digits)")
    p.add_argument("--output", type=image_file, default=Path("samples.png"),
                   help="image file to write, PNG or another format PIL writes (default: samples.png)")
    p.add_argument("--num-samples", type=positive_int, default=100, help="number of images (default: 100)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--class-label", type=int, default=None, help="one class for all samples (default: all classes in turn)")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    check_writable(args.output, "--output")
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
    refuse_non_finite(images, f"the samples of {args.model}")
    # With balanced labels and a row per num_classes images, each column holds one class.
    nrow = num_classes if num_classes and args.class_label is None and args.num_samples >= num_classes else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=nrow).save(args.output)
    logger.info(f"wrote {args.num_samples} samples of {args.model} to {args.output}")
    print(args.output)
    return 0


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
    p.add_argument("--seed", "--seeds", dest="seeds", type=seed_type, nargs="+", default=[EVAL_SEED_OFFSET],
                   help=f"one or more seeds of the evaluation noise (default: {EVAL_SEED_OFFSET}); a quantized model's "
                        "calibration seed gets a warning (its trajectories started from that noise)")
    p.add_argument("--json", action="store_true", help="print one JSON object per model and line")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    show_progress = not args.quiet
    reference_unet, scheduler = zoo.load_model(args.reference, device=device)
    reference_path = zoo.resolve_model_path(args.reference).resolve()
    classifier = zoo.load_digits_classifier()
    real_images, _ = zoo.load_digits_split("test")
    sampling = dict(num_inference_steps=args.steps, batch_size=args.batch_size, show_progress=show_progress)
    reference_samples: dict[int, torch.Tensor] = {}  # seed -> samples, shared by all models

    rows = []
    for model in args.models or [args.reference]:
        is_reference = zoo.resolve_model_path(model).resolve() == reference_path
        unet = reference_unet if is_reference else zoo.load_model(model, device=device)[0]
        calibration_seed = _calibration_seed(unet)
        if calibration_seed in args.seeds:
            logger.warning(f"evaluation seed {calibration_seed} is the calibration seed of {model}: its first samples "
                           "start from the noise its calibration trajectories started from, which flatters it; "
                           f"evaluate with other seeds (calibration seed + {EVAL_SEED_OFFSET} is the convention)")
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


def _calibration_seed(unet: torch.nn.Module) -> int | None:
    """The seed a quantized model was calibrated with (from its quantization config), None for a float model."""
    config = getattr(getattr(unet, "config", None), "quantization_config", None)
    seed = config.get("seed") if isinstance(config, dict) else getattr(config, "seed", None)
    return seed if isinstance(seed, int) else None


def add_push_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="upload a calibrated model with its generated model card to the Hub",
        description="Upload a calibrated model (a calibrate output folder or a saved quantized model) to the Hugging "
        "Face Hub with a generated model card: bits, calibration settings, the measured quality from report.json "
        "and the learned-weights plot.",
    )
    p.add_argument("model", type=Path, help="a calibrate output folder, or a quantized model folder")
    p.add_argument("repo_id", type=repo_id, help="the Hub repository, e.g. my-org/digits-w4a4")
    p.add_argument("--base-model", default=None, help="the full-precision model's Hub id, for the card's metadata")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", type=Path, default=None, metavar="DIR",
                   help="write what would be uploaded into DIR instead of uploading")
    p.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    if not args.model.is_dir():
        raise CLIError(f"model {args.model} is not a folder")
    try:
        zoo.resolve_model_path(args.model)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    if args.dry_run is None and hub_constants.HF_HUB_OFFLINE:
        raise CLIError("push uploads to the Hub, but offline mode is on (HF_HUB_OFFLINE is set); unset it, or write "
                       "what would be uploaded with --dry-run DIR")
    if args.dry_run is not None and args.dry_run.exists() and (not args.dry_run.is_dir() or any(args.dry_run.iterdir())):
        raise CLIError(f"--dry-run {args.dry_run} already exists and is not an empty folder")
    unet, _ = zoo.load_model(args.model)
    if not quantized_components(unet):
        raise CLIError(f"{args.model} holds a full-precision model; run `diffusers-gac calibrate` first")
    evaluation = None
    report_file = args.model / "report.json"
    if report_file.is_file():  # written by `calibrate`: calibration report and evaluation
        evaluation = json.loads(report_file.read_text()).get("evaluation")
    if args.dry_run is not None:
        write_hub_folder(unet, args.dry_run, repo_id=args.repo_id, evaluation=evaluation, base_model=args.base_model)
        print(f"wrote {args.dry_run} (nothing uploaded)")
        return 0
    commit = push_to_hub(unet, args.repo_id, evaluation=evaluation, base_model=args.base_model,
                         private=args.private or None)
    print(f"pushed {args.model} to {args.repo_id}: {commit}")
    return 0
