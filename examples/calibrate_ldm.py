"""Calibrate a diffusion model to low-bit weights and activations, on one process or many (Accelerate).

    # one process (CPU or one GPU); no --model: the embedded digits model
    python examples/calibrate_ldm.py --output outputs/digits-w4a4
    # a latent-diffusion pipeline, two CPU processes (gloo)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no examples/calibrate_ldm.py --model CompVis/ldm-celebahq-256 --output outputs/ldm-w4a4
    # a text-to-image pipeline on 8 GPUs, prompts from a dataset column, then upload
    accelerate launch --multi_gpu --num_processes 8 examples/calibrate_ldm.py --model path/to/sd-pipeline \\
        --prompts-dataset my/prompts --prompts-column text --guidance-scale 7.5 --output outputs/sd-w4a8 --a-bits 8 \\
        --push-to-hub my-org/sd-w4a8

Every process records its own share of the calibration trajectories and the processes calibrate together (see
``diffusers_gac.quantize_model``); only the main process writes and uploads. ``--resume`` continues a calibration
that was interrupted, from the checkpoint folder kept beside the output. The script only parses arguments and calls
the library (``diffusers_gac.calibrate_pretrained``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.utils import logging as dlogging

import diffusers_gac
from diffusers_gac import GACConfig
from diffusers_gac.config import ACT_SCHEMES, WEIGHTINGS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = GACConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="a Hub id, a local pipeline folder, or an embedded model name "
                   "(default: digits)")
    p.add_argument("--output", type=Path, required=True, help="folder to write the calibrated pipeline (or model) to")
    p.add_argument("--w-bits", type=int, default=defaults.w_bits)
    p.add_argument("--a-bits", type=int, default=defaults.a_bits)
    p.add_argument("--act-scheme", choices=ACT_SCHEMES, default=defaults.act_scheme)
    p.add_argument("--weighting", choices=WEIGHTINGS, default=None,
                   help=f"default: {defaults.weighting}; uniform with --act-scheme static")
    p.add_argument("--iters", type=int, default=defaults.iters, help="reconstruction steps per unit")
    p.add_argument("--num-trajectories", type=int, default=defaults.calib_samples_per_timestep,
                   help="calibration trajectories in all (shared by the processes)")
    p.add_argument("--num-timesteps", type=int, default=defaults.calib_num_timesteps,
                   help="sampler steps kept per trajectory")
    p.add_argument("--steps", type=int, default=defaults.calib_num_inference_steps, help="sampler steps")
    p.add_argument("--batch-size", type=int, default=None, help="trajectories per pipeline call (default: all)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance of the trajectories")
    p.add_argument("--prompts-file", type=Path, default=None, help="text file, one calibration prompt per line")
    p.add_argument("--prompts-dataset", default=None, help="a datasets dataset (Hub id, or a folder saved with "
                   "save_to_disk) holding the prompts")
    p.add_argument("--prompts-column", default="text")
    p.add_argument("--prompts-split", default="train")
    p.add_argument("--class-labels", type=int, nargs="*", default=None, help="class labels (default: all, in turn)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--act-group-size", type=int, default=None, help="dynamic activation ranges per channel group")
    p.add_argument("--act-clipping", action="store_true", help="searched per-layer clipping of dynamic ranges")
    p.add_argument("--smoothing", action="store_true", help="searched smoothing (input scales moved into weights)")
    p.add_argument("--lowrank-rank", type=lambda t: float(t) if "." in t else int(t), default=0,
                   help="rank (or fraction in (0, 1)) of a low-rank float branch beside each 4-bit weight")
    p.add_argument("--lowrank-bits", type=int, choices=(8, 16), default=defaults.lowrank_bits,
                   help="storage of the branch's factors: 16 (float16) or 8 (int8 codes)")
    p.add_argument("--resume", action="store_true", help="continue the calibration kept in OUTPUT.checkpoint")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the result to this Hub repository")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    dlogging.set_verbosity_info() if accelerator.is_main_process else dlogging.set_verbosity_error()
    logger = dlogging.get_logger("diffusers_gac.examples.calibrate_ldm")
    check = accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum")  # every process answers
    logger.info(f"world size {accelerator.num_processes}; all-reduce over the processes gave {check.item():g}")
    config = GACConfig(w_bits=args.w_bits, a_bits=args.a_bits, act_scheme=args.act_scheme, weighting=args.weighting,
                       iters=args.iters, calib_samples_per_timestep=args.num_trajectories,
                       calib_num_timesteps=min(args.num_timesteps, args.steps), calib_num_inference_steps=args.steps,
                       seed=args.seed, act_group_size=args.act_group_size, act_clipping=args.act_clipping,
                       smoothing=args.smoothing, lowrank_rank=args.lowrank_rank,
                       lowrank_bits=args.lowrank_bits)
    prompts = diffusers_gac.load_prompts(file=args.prompts_file, dataset=args.prompts_dataset,
                                         column=args.prompts_column, split=args.prompts_split)
    result = diffusers_gac.calibrate_pretrained(
        args.model, config, args.output, prompts=prompts, class_labels=args.class_labels,
        guidance_scale=args.guidance_scale, batch_size=args.batch_size, accelerator=accelerator, resume=args.resume,
        push_to_hub=args.push_to_hub, show_progress=not args.quiet)
    if accelerator.is_main_process:
        print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
