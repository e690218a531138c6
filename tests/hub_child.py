"""Run by tests/test_hub.py in a child process, so that HF_ENDPOINT / HF_HUB_OFFLINE are set before
huggingface_hub is imported. ``push``: calibrate tiny models, push them (model and pipeline) to the loopback Hub
and load them back by repo id; ``offline``: load the pushed model from the cache alone. Prints one JSON line."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline, UNet2DModel
from tiny_models import tiny_unet2d

import diffusers_gac
from diffusers_gac import GACConfig, quantize_model, quantize_pipeline

FAST = dict(iters=4, calib_num_inference_steps=5, calib_num_timesteps=3, calib_samples_per_timestep=4, batch_size=8)


def probe(model):
    g = torch.Generator().manual_seed(0)
    call = dict(sample=torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([10, 900]))
    if model.config.num_class_embeds:
        call["class_labels"] = torch.tensor([1, 2])
    with torch.no_grad():
        return model(**call).sample


def push(workdir: Path) -> dict:
    out = {}
    model = tiny_unet2d()
    quantize_model(model, GACConfig(weighting="gradient_aligned", gac_meta_steps=2, **FAST),
                   scheduler=DDIMScheduler(num_train_timesteps=1000), show_progress=False)
    reference = probe(model)
    torch.save(reference, workdir / "reference.pt")
    commit = diffusers_gac.push_to_hub(model, "org/tiny-w4a4")  # checkpoint, report, plot, generated card
    out["model_commit"] = str(commit)
    loaded = UNet2DModel.from_pretrained("org/tiny-w4a4")
    out["model_identical"] = bool(torch.equal(probe(loaded), reference))
    out["model_is_quantized"] = bool(loaded.is_quantized)

    pipe = DDPMPipeline(unet=tiny_unet2d(class_conditional=False), scheduler=DDIMScheduler(num_train_timesteps=1000))
    quantize_pipeline(pipe, GACConfig(**FAST), show_progress=False)
    pipe_reference = probe(pipe.unet)
    diffusers_gac.push_to_hub(pipe, "org/tiny-ddpm-w4a4")
    again = DiffusionPipeline.from_pretrained("org/tiny-ddpm-w4a4")
    out["pipeline_identical"] = bool(torch.equal(probe(again.unet), pipe_reference))
    pipe.push_to_hub("org/tiny-ddpm-w4a4-native")  # diffusers' own pipeline upload also round-trips
    native = DiffusionPipeline.from_pretrained("org/tiny-ddpm-w4a4-native")
    out["native_pipeline_identical"] = bool(torch.equal(probe(native.unet), pipe_reference))
    model.push_to_hub("org/tiny-w4a4-native")  # diffusers' own model upload too
    out["native_model_identical"] = bool(torch.equal(probe(UNet2DModel.from_pretrained("org/tiny-w4a4-native")), reference))
    return out


def offline(workdir: Path) -> dict:
    loaded = UNet2DModel.from_pretrained("org/tiny-w4a4")
    return {"offline_identical": bool(torch.equal(probe(loaded), torch.load(workdir / "reference.pt")))}


if __name__ == "__main__":
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    result = push(workdir) if mode == "push" else offline(workdir)
    print(json.dumps(result))
