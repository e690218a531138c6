"""Which sampler steps' quantization errors reach the final sample, for docs/results/gac.md.

Calibrates an embedded model once per weighting (``--set`` GACConfig options), then for every
DDIM step ``k`` samples with the quantized denoiser at step ``k`` only (full precision elsewhere) and measures the
mean squared difference of the final samples from the full-precision ones. Beside it: the mean squared error of the
quantized noise prediction along the full-precision trajectory (the per-step terms the trajectory MSE averages).
(Each step's influence measured by perturbation, as calibration measures it for
``gac_validation_weighting="sample_influence"``, is ``diffusers_gac.calibration.influence.step_influence``.)

    python benchmarks/gac_step_attribution.py --model photos --output docs/results/gac_step_attribution_photos.json
    python benchmarks/gac_step_attribution.py --summarize docs/results/gac_step_attribution_*.json

``--summarize`` prints, per result file and by contiguous group of sampler steps, each group's share of the final
samples' error (quantized at that group's steps only, summed over its steps) and its share of the trajectory MSE
(the per-step prediction errors the trajectory MSE averages), for every weighting.

Each ``--weightings`` entry is calibrated with the same seed, so the per-step errors of uniform and learned weights
sit side by side; the trajectories start from the evaluation seed (calibration seed + 1000).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def attribute(fp, quantized, scheduler, noise, conditioning, steps: int) -> dict:
    """Per sampler step, along the full-precision trajectories from ``noise``: the quantized prediction's mean squared
    error (what the trajectory MSE averages), and the final sample's mean squared difference from full precision
    when the quantized prediction is used at that step only; and the difference when it is used at every step."""
    from diffusers_gac.sampling import denoise, fresh_scheduler

    sampler = fresh_scheduler(scheduler)

    def run(quantized_steps: set[int]) -> tuple[torch.Tensor, list[float]]:
        eps_err = []

        def on_step(step):
            if not quantized_steps:
                eps_err.append((step.predict(quantized) - step.prediction).pow(2).mean().item())
            return step.predict(quantized) if step.index in quantized_steps else None

        x = denoise(fp, sampler, noise, num_inference_steps=steps, conditioning=conditioning, on_step=on_step)
        return x.float(), eps_err

    reference, eps_err = run(set())
    every, _ = run(set(range(steps)))
    return {"final_mse_all_steps_quantized": (every - reference).pow(2).mean().item(),
            "final_mse_one_step_quantized": [(run({k})[0] - reference).pow(2).mean().item() for k in range(steps)],
            "noise_prediction_mse_on_fp_trajectory": eps_err}


def summarize(paths: list[Path], groups: int = 5) -> str:
    """Markdown: per file and weighting, where the final samples' error and the trajectory MSE come from."""
    lines = []
    for path in paths:
        result = json.loads(path.read_text())
        steps = result["timesteps"]
        bounds = [round(i * len(steps) / groups) for i in range(groups + 1)]
        spans = [f"t={steps[a]}..{steps[b - 1]}" for a, b in zip(bounds, bounds[1:])]
        lines += [f"{path.name} (`{result['command']}`)", "",
                  "| weighting | final MSE, all steps quantized (x1e-3) | trajectory MSE (x1e-3) | share of | "
                  + " | ".join(spans) + " |", "|---|---|---|---|" + "---|" * groups]
        for name, w in result["weightings"].items():
            one, eps = w["final_mse_one_step_quantized"], w["noise_prediction_mse_on_fp_trajectory"]
            for label, values in (("final-sample error", one), ("trajectory MSE", eps)):
                total = sum(values)
                shares = [sum(values[a:b]) / total for a, b in zip(bounds, bounds[1:])]
                lines.append(f"| {name} | {1e3 * w['final_mse_all_steps_quantized']:.3f} | "
                             f"{1e3 * sum(eps) / len(eps):.3f} | {label} | "
                             + " | ".join(f"{100 * x:.1f}%" for x in shares) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if "--summarize" in sys.argv:
        print(summarize([Path(x) for x in sys.argv[sys.argv.index("--summarize") + 1:]]))
        return
    from diffusers.utils import logging as dlogging

    from diffusers_gac import GACConfig, quantize_model
    from diffusers_gac.evaluation import evaluation_seed
    from diffusers_gac.sampling import fresh_scheduler, resolve_labels, sample_shape
    from diffusers_gac.zoo import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--model", default="digits", help="an embedded model (digits, photos)")
    p.add_argument("--seed", type=int, default=0, help="the calibration seed; trajectories start from seed + 1000")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--weightings", nargs="+", default=["uniform", "gradient_aligned"])
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE")
    a = p.parse_args()
    dlogging.set_verbosity_error()
    torch.set_num_threads(1)
    fp, scheduler = load_model(a.model)
    g = torch.Generator().manual_seed(evaluation_seed(a.seed))  # disjoint from the calibration trajectories
    noise = torch.randn(sample_shape(fp, a.num_samples), generator=g)
    labels = resolve_labels(fp, a.num_samples, None)
    conditioning = {"class_labels": labels} if labels is not None else None
    result = {
        "command": "python benchmarks/gac_step_attribution.py " + " ".join(
            [f"--output {a.output}", f"--model {a.model}", f"--seed {a.seed}", f"--steps {a.steps}",
             f"--num-samples {a.num_samples}", "--weightings", *a.weightings] + (["--set", *a.set] if a.set else [])),
        "weightings": {},
    }
    sampler = fresh_scheduler(scheduler)
    sampler.set_timesteps(a.steps)
    result["timesteps"] = [int(t) for t in sampler.timesteps]
    for weighting in a.weightings:
        options = {"w_bits": 4, "a_bits": 4, "seed": a.seed, "calib_num_inference_steps": a.steps,
                   "weighting": weighting}
        options.update({k: parse_value(v) for k, _, v in (s.partition("=") for s in a.set)})
        config = GACConfig(**options)
        quantized = copy.deepcopy(fp)
        quantize_model(quantized, config, scheduler=scheduler, show_progress=False)
        result["weightings"][weighting] = {"config": config.to_diff_dict(),
                                           **attribute(fp, quantized, scheduler, noise, conditioning, a.steps)}
        print(weighting, json.dumps(result["weightings"][weighting])[:600], flush=True)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
