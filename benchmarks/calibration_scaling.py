"""How calibration scales: processes, and model and data size (docs/results/calibration_scaling.md).

Part ``processes``: the embedded digits model calibrated by ``examples/calibrate_ldm.py`` as one process with one
and with two torch threads, and as two data-parallel processes of one thread each (``accelerate launch``, gloo).
Wall time of the whole command, and each process's peak resident memory.

Part ``sd``: a randomly initialised ``UNet2DConditionModel`` with Stable-Diffusion-1.5-sized blocks (320/640/1280/
1280 channels, two layers per block, cross-attention 768) at a small latent size, calibrated at W4A4 on growing
calibration sets. To keep the run short, only the units of ``--blocks`` are converted and reconstructed (the rest of
the network still runs, in full precision, to produce their inputs), with ``--iters`` steps each; per unit the
seconds spent capturing its inputs and targets, setting its ranges and per reconstruction step, and the process's
peak resident memory, so a full run (every unit, 400 steps) can be extrapolated. Every size runs in a process of its
own.

    python benchmarks/calibration_scaling.py --part processes --output docs/results/calibration_scaling_processes.md
    python benchmarks/calibration_scaling.py --part sd --trajectories 8 16 32 --output docs/results/calibration_scaling_sd.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SD_BLOCKS = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, in_channels=4, out_channels=4)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- part processes -------------------------------------------------------------------------------------------------


def child_processes(args: argparse.Namespace) -> None:
    """One process of a ``processes`` run: calibrate through the library, then report its own numbers."""
    import torch
    from accelerate import Accelerator

    import diffusers_gac
    from diffusers_gac import GACConfig

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    config = GACConfig(iters=args.iters, calib_samples_per_timestep=args.num_trajectories, seed=0)
    start = time.time()
    diffusers_gac.calibrate_pretrained("digits", config, args.out, accelerator=accelerator, show_progress=False)
    row = {"rank": accelerator.process_index, "processes": accelerator.num_processes, "threads": args.threads,
           "seconds": round(time.time() - start, 1), "peak_rss_mb": peak_rss_mb()}
    print("ROW " + json.dumps(row), flush=True)


def run_processes(args: argparse.Namespace) -> list[dict]:
    rows = []
    for processes, threads in ((1, 1), (1, 2), (2, 1)):
        out = Path(args.workdir) / f"p{processes}-t{threads}"
        base = [str(Path(__file__).resolve()), "--child", "processes", "--out", str(out), "--threads", str(threads),
                "--iters", str(args.iters), "--num-trajectories", str(args.num_trajectories)]
        if processes == 1:
            cmd = [sys.executable, *base]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), *base]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(threads)}
        start = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        wall = round(time.time() - start, 1)
        children = [json.loads(line[4:]) for line in result.stdout.splitlines() if line.startswith("ROW ")]
        rows.append({"processes": processes, "threads": threads, "wall_seconds": wall,
                     "peak_rss_mb": [c["peak_rss_mb"] for c in sorted(children, key=lambda c: c["rank"])]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


# -- part sd --------------------------------------------------------------------------------------------------------


def child_sd(args: argparse.Namespace) -> None:
    """One calibration-set size of the ``sd`` part, in a process of its own."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    from diffusers_gac import GACConfig
    from diffusers_gac.calibration.flow import record_calibration_data
    from diffusers_gac.calibration.reconstruction import reconstruct_model
    from diffusers_gac.quant.convert import convert_model
    from diffusers_gac.sampling import prompt_embeds_sampler

    dlogging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.latent, **SD_BLOCKS).eval()
    embeds = torch.randn(4, 77, 768, generator=torch.Generator().manual_seed(1))
    keep_out = [n for n, _ in unet.named_children() if n not in ("down_blocks", "mid_block", "up_blocks")]
    keep_out += [f"{kind}.{i}" for kind in ("down_blocks", "up_blocks") for i in range(4)
                 if f"{kind}.{i}" not in args.blocks]
    keep_out += [] if "mid_block" in args.blocks else ["mid_block"]
    config = GACConfig(w_bits=4, a_bits=4, iters=args.iters, calib_num_inference_steps=args.steps,
                       calib_num_timesteps=args.kept_steps, calib_samples_per_timestep=args.trajectories,
                       modules_to_not_convert=keep_out, special_bits=None)
    start = time.time()
    sampler = prompt_embeds_sampler(unet, DDIMScheduler(num_train_timesteps=1000), args.steps, embeds,
                                    show_progress=False)
    data = record_calibration_data(unet, sampler, config)
    record = time.time() - start
    convert_model(unet, config)
    reports = reconstruct_model(unet, data, config, show_progress=False)
    units = [{"unit": r.name, "kind": r.kind, "seconds": r.seconds} for r in reports]
    row = {"trajectories": args.trajectories, "samples": len(data), "latent": args.latent, "iters": args.iters,
           "record_seconds": round(record, 1), "units": units, "peak_rss_mb": peak_rss_mb(),
           "data_mb": round(sum(v.numel() * v.element_size() for v in data.inputs.values()) / 2**20, 1),
           "model_mb": round(sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20, 1)}
    print("ROW " + json.dumps(row), flush=True)


def run_sd(args: argparse.Namespace) -> list[dict]:
    rows = []
    for trajectories in args.trajectories:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "sd", "--threads", str(args.threads),
               "--iters", str(args.iters), "--latent", str(args.latent), "--steps", str(args.steps),
               "--kept-steps", str(args.kept_steps), "--blocks", *args.blocks, "--trajectory-count",
               str(trajectories)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        rows += [json.loads(line[4:]) for line in result.stdout.splitlines() if line.startswith("ROW ")]
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "units"}), file=sys.stderr)
    return rows


# -- tables ---------------------------------------------------------------------------------------------------------


def table(part: str, rows: list[dict], command: str, threads: int) -> str:
    head = [f"Measured {date.today().isoformat()} on {os.cpu_count()} CPU cores (nothing else running). Command:", "",
            "```", command, "```", ""]
    if part == "processes":
        head += ["| processes x threads | wall time (s) | peak RSS per process (MB) |", "|---|---|---|"]
        head += [f"| {r['processes']} x {r['threads']} | {r['wall_seconds']:.1f} | "
                 f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} |" for r in rows]
        return "\n".join(head) + "\n"
    head += [f"{threads} torch thread(s). Per unit: seconds in all (capture of its inputs and targets, range set-up "
             f"and {rows[0]['iters']} reconstruction steps).", "",
             "| trajectories | samples | calibration data (MB) | recording (s) | unit | seconds | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for i, u in enumerate(r["units"]):
            lead = [str(r["trajectories"]), str(r["samples"]), f"{r['data_mb']:.1f}", f"{r['record_seconds']:.0f}"]
            rss = f"{r['peak_rss_mb']:.0f}"
            cells = (lead if i == 0 else [""] * 4) + [f"{u['unit']} ({u['kind']})", f"{u['seconds']:.1f}",
                                                       rss if i == 0 else ""]
            head.append("| " + " | ".join(cells) + " |")
    return "\n".join(head) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["processes", "sd"])
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--workdir", default=None, help="where the runs write their models (default: a temporary folder)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--num-trajectories", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trajectories", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kept-steps", type=int, default=4)
    p.add_argument("--blocks", nargs="+", default=["down_blocks.1", "mid_block"])
    p.add_argument("--child", choices=["processes", "sd"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--trajectory-count", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child == "processes":
        return child_processes(a)
    if a.child == "sd":
        a.trajectories = a.trajectory_count
        return child_sd(a)
    if a.part is None:
        p.error("--part is required")
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="calibration_scaling-")
    rows = run_processes(a) if a.part == "processes" else run_sd(a)
    command = "python " + " ".join(["benchmarks/calibration_scaling.py", *(argv if argv is not None else sys.argv[1:])])
    text = table(a.part, rows, command, a.threads)
    print(text)
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(text)
        a.output.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
