"""What the checkpoint digest costs on a Stable-Diffusion-sized UNet: bytes in the file, seconds to compute it when
saving and to check it when loading, beside the save and the whole ``from_pretrained``.

The UNet has SD 1.5's architecture with random weights, quantized W4A4 with round-to-nearest on a tiny calibration
set (the checkpoint's layout, and so its size and the digest's cost, do not depend on how rounding was learned).
Save and load run ``--repeats`` times, interleaved; the digest alone is timed on the same files. Writes a markdown
table:

    python benchmarks/checkpoint_digest.py --output docs/results/checkpoint_digest.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils import logging as dlogging

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model
from diffusers_gac.quant.digest import read_header, state_dict_digest, verify_files
from diffusers_gac.sampling import prompt_embeds_sampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp_baseline import cpu_name  # noqa: E402  (benchmarks/fp_baseline.py)
from inference_speed import SD_CHANNELS, sd_unet  # noqa: E402  (benchmarks/inference_speed.py)

WEIGHTS = "diffusion_pytorch_model.safetensors"


def quantized_sd_unet(threads: int) -> torch.nn.Module:
    torch.set_num_threads(threads)
    unet = sd_unet(SD_CHANNELS, 768)
    unet.register_to_config(sample_size=16)  # calibration samples at 16x16 latents: the layout does not depend on it
    config = GACConfig(w_bits=4, a_bits=4, reconstruction="none", weight_init="minmax", calib_num_inference_steps=2,
                       calib_num_timesteps=1, calib_samples_per_timestep=1, batch_size=1)
    sampler = prompt_embeds_sampler(unet, DDIMScheduler(num_train_timesteps=1000), 2, torch.randn(1, 77, 768),
                                    show_progress=False)
    quantize_model(unet, config, sampler=sampler, show_progress=False)
    return unet


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    dlogging.set_verbosity_error()
    model = quantized_sd_unet(args.threads)
    config = model.hf_quantizer.quantization_config
    state = model.state_dict()
    times = {k: [] for k in ("save", "digest when saving", "load", "digest check when loading")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "w4a4"
        for _ in range(args.repeats):
            times["save"].append(timed(lambda: diffusers_gac.save_pretrained(model, folder)))
            times["digest when saving"].append(timed(lambda: state_dict_digest(state, config)))
            times["load"].append(timed(lambda: UNet2DConditionModel.from_pretrained(folder)))
            times["digest check when loading"].append(timed(lambda: verify_files([str(folder / WEIGHTS)])))
        size = (folder / WEIGHTS).stat().st_size
        header, _, _ = read_header(folder / WEIGHTS)
        digest_bytes = len(header["__metadata__"]["gac_digest"])
        tensors = len(header) - 1
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# What the checkpoint digest costs (SD-sized UNet, W4A4)",
        "",
        f"Command: `python benchmarks/checkpoint_digest.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Machine: {cpu_name()}, {args.threads} threads; median of {args.repeats} interleaved repeats. Stable Diffusion "
        "1.5's UNet architecture (random weights), W4A4 with round-to-nearest.",
        "",
        f"Checkpoint: {size / 2**20:.1f} MiB, {tensors} tensors; the digest record in its header: "
        f"{digest_bytes / 1024:.1f} KiB ({100 * digest_bytes / size:.3f}% of the file).",
        "",
        "| step | seconds (median) | min - max | share |",
        "|---|---|---|---|",
    ]
    for key, values in times.items():
        whole = med["save"] if "sav" in key else med["load"]
        share = "-" if key in ("save", "load") else f"{100 * med[key] / whole:.0f}% of the {'save' if 'sav' in key else 'load'}"
        lines.append(f"| {key} | {med[key]:.2f} | {min(values):.2f} - {max(values):.2f} | {share} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
