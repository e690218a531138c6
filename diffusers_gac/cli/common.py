"""What every subcommand shares: argument types, the device default, errors reported like argparse's."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from PIL import Image

from .. import zoo
from ..checks import MAX_SEED, check_device
from ..evaluation import format_mean_std

MIN_BITS, MAX_BITS = 2, 8


class CLIError(Exception):
    """A bad command line found after parsing; reported like an argparse error (exit code 2)."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_writable(path: Path, option: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder this process may write into (checked
    before any work, so a long run does not end on an unwritable output)."""
    parent = path.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: cannot create it, {parent} is not a folder this user can write to")


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


def optional_bits(value: str) -> int | None:
    """``--a-bits``: a bit width, or ``none`` to keep activations in full precision."""
    return None if value.lower() in ("none", "fp", "32") else bits(value)


def seed(value: str) -> int:
    """A seed: an integer from 0 to 2**63 - 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {value!r}") from None
    if not 0 <= number <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to 2**63 - 1, got {number}")
    return number


def device(value: str) -> str:
    """``--device``: a device this machine has (checked before anything loads)."""
    try:
        check_device(value, "--device")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device ")) from None
    return value


def image_file(value: str) -> Path:
    """An image file to write, whose extension PIL can write (checked before any sampling)."""
    path = Path(value)
    extensions = {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if path.suffix.lower() not in extensions:
        common = [e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".gif") if e in extensions]
        raise argparse.ArgumentTypeError(f"{value!r} has no image extension PIL can write ({path.suffix or 'none'}); "
                                         f"use one of {', '.join(common)}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a folder; give an image file name such as {path / 'samples.png'}")
    return path


def repo_id(value: str) -> str:
    """A Hub repository id (``name`` or ``namespace/name``), checked before anything is written."""
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a Hub repository id such as my-org/digits-w4a4: "
                                         f"{str(err).split(':')[0]}") from None
    return value


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


def sampling_options() -> argparse.ArgumentParser:
    """Options every sampling subcommand shares."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--steps", type=positive_int, default=25, help="DDIM inference steps (default: 25)")
    parent.add_argument("--batch-size", type=positive_int, default=256, help="samples per forward pass (default: 256)")
    parent.add_argument("--device", type=device, default=None, help="torch device (default: cuda, then mps, then cpu)")
    parent.add_argument("--quiet", action="store_true", help="no progress bars")
    return parent


def format_table(rows: list[dict]) -> str:
    """A plain-text table of evaluation summaries (mean ± std over seeds), one row per model."""
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
