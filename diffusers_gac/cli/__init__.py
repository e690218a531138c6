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

from diffusers.utils import logging as dlogging

from .calibrate import add_calibrate_parser
from .commands import add_evaluate_parser, add_push_parser, add_sample_parser
from .common import CLIError, sampling_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-gac", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (diffusers info level)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sampling = sampling_options()
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
