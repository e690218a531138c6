"""The ``diffusers-gac`` command. Each subcommand only parses its arguments and calls the library; the help text
below (``DESCRIPTION``) is what ``--help`` prints."""

from __future__ import annotations

import argparse

from diffusers.utils import logging as dlogging
from huggingface_hub import constants as hub_constants

from .calibrate import add_calibrate_parser
from .commands import add_evaluate_parser, add_push_parser, add_sample_parser
from .common import CLIError, one_line, sampling_options

DESCRIPTION = """\
Post-training quantization of diffusers models with gradient-aligned calibration.

examples:
  diffusers-gac calibrate --w-bits 4 --a-bits 4 --output outputs/digits-w4a4
  diffusers-gac sample --model digits --output samples.png --num-samples 100 --steps 25
  diffusers-gac evaluate path/to/quantized --reference digits --num-samples 1000 --seeds 1000 1001 1002 --json
  diffusers-gac push outputs/digits-w4a4 my-org/digits-w4a4

A model is an embedded name (digits) or a folder: a diffusers model folder (with config.json) or one with unet/
and optionally scheduler/ subfolders. Bad input ends with one line on stderr and exit code 2; -v shows tracebacks.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-gac", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (diffusers info level) and show tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sampling = sampling_options()
    add_sample_parser(subparsers, [sampling])
    add_evaluate_parser(subparsers, [sampling])
    add_calibrate_parser(subparsers, [sampling])
    add_push_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Every failure ends in ``SystemExit``: a bad command line with argparse's usage and error
    (exit code 2); bad input the library refuses, a damaged checkpoint or a failed upload with one line (exit code 2);
    Ctrl-C with one line (exit code 130). ``-v`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        dlogging.set_verbosity_info()
    try:
        return args.func(args)
    except CLIError as err:
        parser.error(f"{args.command}: {one_line(err)}")
    except KeyboardInterrupt:
        if args.verbose:
            raise
        fresh_line = "" if getattr(args, "quiet", False) else "\n"  # a progress bar leaves its line open
        parser.exit(130, f"{fresh_line}diffusers-gac {args.command}: interrupted\n")
    except (ValueError, OSError) as err:  # the library's refusals, missing files, the Hub's answers
        if args.verbose:
            raise
        parser.exit(2, f"diffusers-gac {args.command}: error: {one_line(err)}\n")
    except Exception as err:
        if args.verbose or not is_network_error(err):
            raise
        parser.exit(2, f"diffusers-gac {args.command}: error: could not reach the Hub ({hub_constants.ENDPOINT}): "
                       f"{one_line(err)}\n")


def is_network_error(err: BaseException) -> bool:
    """A failure of the HTTP stack under huggingface_hub (no network, a refused connection, a timeout), which is
    not an OSError in every release of its HTTP libraries."""
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
               for c in type(err).__mro__)
