"""How much an error in the denoiser's output at each sampler step reaches the end of the trajectory.

A quantized denoiser errs at every step, but the steps do not matter alike: an error early in the trajectory is
carried (and partly undone) by every later step, an error at the last steps barely moves the sample. The influence of
step ``k`` is measured on the full-precision denoiser by perturbation: the sampler runs ``trajectories`` seeded
trajectories once as they are, then once per step with ``scale * z`` (``z`` a fixed standard normal) added to the
denoiser's output at that step only, and the influence is the mean squared change of the last denoiser input (the
state the sampler's last step denoises) divided by ``scale ** 2``. The last step's own influence cannot be seen there;
it takes the value of the step before it (on the embedded models the last step's measured effect on the final
sample is a hundredth of that). Any sampler that calls the denoiser ``num_inference_steps`` times per batch of
trajectories works, classifier-free guidance included (both copies get the same perturbation).

``gac_validation_weighting="sample_influence"`` weights GAC's validation error by it, so the learned weights are
judged by the steps whose errors reach the samples rather than by the steps whose unit errors are largest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import _call_kwargs, _guidance_copies, _sample_input
from .units import unit_output


class _Perturber:
    """A forward hook that counts the denoiser's calls, perturbs the output at one step and keeps the inputs of the
    last step and the timestep of every step."""

    def __init__(self, num_inference_steps: int, scale: float, seed: int):
        self.steps, self.scale, self.seed = num_inference_steps, scale, seed
        self.perturbed: int | None = None
        self.calls = 0
        self.last_inputs: list[torch.Tensor] = []
        self.timesteps: dict[int, float] = {}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        named = _call_kwargs(module, args, kwargs)
        step = self.calls % self.steps
        batch_number = self.calls // self.steps
        self.calls += 1
        t = named.get("timestep")
        if t is not None and step not in self.timesteps:
            self.timesteps[step] = float(torch.as_tensor(t).reshape(-1)[0])
        if step == self.steps - 1:
            self.last_inputs.append(_sample_input(named).detach().float().cpu())
        if step != self.perturbed:
            return None
        pred = unit_output(out)
        copies = _guidance_copies(named, pred.shape[0])
        generator = torch.Generator().manual_seed(self.seed + 7_919 * batch_number + step)
        z = torch.randn((pred.shape[0] // copies, *pred.shape[1:]), generator=generator)
        pushed = pred + self.scale * z.repeat(copies, *[1] * (pred.dim() - 1)).to(pred)
        if torch.is_tensor(out):
            return pushed
        if isinstance(out, tuple):
            return (pushed, *out[1:])
        out.sample = pushed
        return out


@torch.no_grad()
def step_influence(denoiser: nn.Module, sampler, num_inference_steps: int, *, trajectories: int = 16,
                   scale: float = 0.05, seed: int = 0) -> dict[float, float]:
    """``{timestep: influence}`` of every sampler step (see the module docstring); ``sampler(n, seed)`` runs ``n``
    trajectories of the full-precision ``denoiser``."""
    if num_inference_steps < 2:
        raise ValueError(f"step influence needs at least 2 sampler steps, got num_inference_steps={num_inference_steps}")
    hook = _Perturber(num_inference_steps, scale, seed)
    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        def last_state(perturbed: int | None) -> torch.Tensor:
            hook.perturbed, hook.calls = perturbed, 0
            hook.last_inputs.clear()
            sampler(trajectories, seed)
            if hook.calls == 0 or hook.calls % num_inference_steps:
                raise ValueError(f"the sampler called the denoiser {hook.calls} times, which is not a whole number "
                                 f"of trajectories of calib_num_inference_steps={num_inference_steps} calls")
            return torch.cat(hook.last_inputs)

        reference = last_state(None)
        influence = [(last_state(k) - reference).pow(2).mean().item() / scale**2
                     for k in range(num_inference_steps - 1)]
    finally:
        handle.remove()
    influence.append(influence[-1])
    if len(hook.timesteps) != num_inference_steps:
        raise ValueError("step influence needs a denoiser called with a timestep at every step")
    return {hook.timesteps[k]: value for k, value in enumerate(influence)}
