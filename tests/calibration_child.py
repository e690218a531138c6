"""Run by tests/test_distributed.py as a separate process (under ``accelerate launch`` for two processes): calibrate
the tiny UNet, data-parallel when launched with several processes, optionally resumable from a checkpoint folder.

    python tests/calibration_child.py OUT [--checkpoint DIR] [--data FILE]

Writes ``OUT/state-<rank>.safetensors`` (every process's final model state and, under ``probe.*``, the quantized and
full-precision outputs on a fixed call), ``OUT/data-<rank>.safetensors`` (its calibration data) and
``OUT/world.json`` (the process count and the result of an all-reduce).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import example_call, tiny_unet2d  # noqa: E402

from diffusers_gac import CalibrationData, GACConfig, quantize_model  # noqa: E402
from diffusers_gac.calibration.flow import record_calibration_data  # noqa: E402
from diffusers_gac.sampling import scheduler_sampler  # noqa: E402

CONFIG = dict(iters=30, calib_num_inference_steps=6, calib_num_timesteps=6, calib_samples_per_timestep=8, batch_size=8,
              a_bits=8, act_scheme="static")


def state_with_probe(model) -> dict:
    """The model's state and its output (and the full-precision model's) on one fixed call."""
    call = example_call(model, batch=16, seed=123)
    with torch.no_grad():
        out, fp = model(**call).sample, tiny_unet2d()(**call).sample
    return {**model.state_dict(), "probe.quantized": out, "probe.full_precision": fp}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--data", type=Path, nargs="*", default=None, help="calibrate single-process on these shards")
    p.add_argument("--weighting", default="gradient_aligned")
    p.add_argument("--iters", type=int, default=CONFIG["iters"])
    p.add_argument("--act-scheme", default=CONFIG["act_scheme"])
    a = p.parse_args()
    torch.set_num_threads(1)
    config = GACConfig(**{**CONFIG, "iters": a.iters, "act_scheme": a.act_scheme}, weighting=a.weighting,
                       gac_meta_every=5)
    model, scheduler = tiny_unet2d(), DDIMScheduler(num_train_timesteps=1000)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.data:  # the single-process reference: every shard's data, in process order
        parts = [CalibrationData.load(f) for f in a.data]
        data = CalibrationData({k: torch.cat([d.inputs[k] for d in parts]) for k in parts[0].inputs},
                               torch.cat([d.step_index for d in parts]), {})
        quantize_model(model, config, calibration_data=data, show_progress=False)
        save_file(state_with_probe(model), str(a.out / "state-single.safetensors"))
        return
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    total = accelerator.reduce(torch.tensor([rank + 1.0]), reduction="sum").item()  # a collective, for the record
    sampler = scheduler_sampler(model, scheduler, config.calib_num_inference_steps, show_progress=False)
    data = record_calibration_data(model, sampler, config, rank=rank, world=accelerator.num_processes)
    data.save(a.out / f"data-{rank}.safetensors")
    quantize_model(model, config, calibration_data=data, show_progress=False, accelerator=accelerator,
                   checkpoint_dir=a.checkpoint)
    save_file(state_with_probe(model), str(a.out / f"state-{rank}.safetensors"))
    if accelerator.is_main_process:
        (a.out / "world.json").write_text(json.dumps({"processes": accelerator.num_processes, "sum": total}))


if __name__ == "__main__":
    main()
