"""Which sampler steps' quantization errors reach the final sample, for docs/results/gac.md.

Calibrates the embedded model once (``--set`` GACConfig options, uniform weighting by default), then for every
DDIM step ``k`` samples with the quantized denoiser at step ``k`` only (full precision elsewhere) and measures the
mean squared difference of the final samples from the full-precision ones. Beside it: the step's importance as
``gac_timestep_importance="perturbation"`` measures it (random perturbation of the noise prediction) and the mean
squared error of the quantized noise prediction along the full-precision trajectory, whose product is the
first-order prediction of the step's share.

    python benchmarks/gac_step_attribution.py --output docs/results/gac_step_attribution.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@torch.no_grad()
def timestep_importance(denoiser, scheduler, num_inference_steps: int, *, trajectories: int = 32,
                        scale: float = 0.05, seed: int = 0) -> dict[float, float]:
    """How much an error in the noise prediction at each sampler step moves the final sample: the mean squared
    change of the final sample when ``scale * z`` (``z`` a fixed standard normal) is added to the prediction at that
    step only, divided by ``scale ** 2``, over ``trajectories`` seeded noises. ``{timestep: importance}``."""
    from diffusers_gac.sampling import denoise, fresh_scheduler, resolve_labels, sample_shape

    generator = torch.Generator().manual_seed(seed)
    shape = sample_shape(denoiser, trajectories)
    noise = torch.randn(shape, generator=generator)
    push = torch.randn(shape, generator=generator) * scale
    labels = resolve_labels(denoiser, trajectories, None)
    conditioning = {"class_labels": labels} if labels is not None else None
    sampler = fresh_scheduler(scheduler)

    def final_sample(perturbed_step):
        def perturb(step):
            return step.prediction + push.to(step.prediction) if step.index == perturbed_step else None

        return denoise(denoiser, sampler, noise, num_inference_steps=num_inference_steps, conditioning=conditioning,
                       on_step=perturb).float()

    base = final_sample(None)
    steps = [float(t) for t in sampler.timesteps]
    return {t: ((final_sample(k) - base).pow(2).mean() / scale**2).item() for k, t in enumerate(steps)}


def main() -> None:
    from diffusers.utils import logging as dlogging

    from diffusers_gac import GACConfig, quantize_model
    from diffusers_gac.sampling import balanced_labels, denoise, fresh_scheduler
    from diffusers_gac.zoo import load_embedded_scheduler, load_embedded_unet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE")
    a = p.parse_args()
    dlogging.set_verbosity_error()
    torch.set_num_threads(1)
    options = {"w_bits": 4, "a_bits": 4, "seed": a.seed, "calib_num_inference_steps": a.steps}
    options.update({k: parse_value(v) for k, _, v in (s.partition("=") for s in a.set)})
    fp = load_embedded_unet()
    scheduler = load_embedded_scheduler()
    config = GACConfig(**options)
    quantized = copy.deepcopy(fp)
    quantize_model(quantized, config, scheduler=scheduler, show_progress=False)

    g = torch.Generator().manual_seed(a.seed + 1)
    noise = torch.randn(a.num_samples, 1, 8, 8, generator=g)
    labels = balanced_labels(a.num_samples, fp.config.num_class_embeds)
    conditioning = {"class_labels": labels}
    sampler = fresh_scheduler(scheduler)

    def run(quantized_steps: set[int]) -> tuple[torch.Tensor, list[float]]:
        """The full-precision trajectory with the quantized prediction at ``quantized_steps``; with none, also the
        quantized model's prediction error along it."""
        eps_err = []

        def on_step(step):
            if not quantized_steps:
                eps_err.append((step.predict(quantized) - step.prediction).pow(2).mean().item())
            if step.index in quantized_steps:
                return step.predict(quantized)
            return None

        x = denoise(fp, sampler, noise, num_inference_steps=a.steps, conditioning=conditioning, on_step=on_step)
        return x, eps_err

    reference, eps_err = run(set())
    every, _ = run(set(range(a.steps)))
    share = [(run({k})[0] - reference).pow(2).mean().item() for k in range(a.steps)]
    importance = timestep_importance(fp, scheduler, a.steps, seed=a.seed)
    result = {
        "command": "python benchmarks/gac_step_attribution.py " + " ".join(
            [f"--output {a.output}", f"--seed {a.seed}", f"--steps {a.steps}", f"--num-samples {a.num_samples}"]
            + (["--set", *a.set] if a.set else [])),
        "config": config.to_diff_dict(),
        "timesteps": [int(t) for t in sampler.timesteps],
        "final_mse_all_steps_quantized": (every - reference).pow(2).mean().item(),
        "final_mse_one_step_quantized": share,
        "noise_prediction_mse_on_fp_trajectory": eps_err,
        "perturbation_importance": list(importance.values()),
        "first_order_prediction": [i * e for i, e in zip(importance.values(), eps_err)],
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=None)[:3000])


if __name__ == "__main__":
    main()
