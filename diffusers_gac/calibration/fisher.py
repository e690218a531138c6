"""A fixed per-timestep weighting by output sensitivity (Fisher information): the non-learned baseline for GAC.

For each unit and sampler step ``t``, ``F_t`` is the mean over a few calibration samples of that step of
``||J_i^T u_i||^2``, where ``J_i`` is the Jacobian of the denoiser's output with respect to the unit's output on
sample ``i`` (earlier units quantized, later ones in full precision) and ``u_i`` a standard normal probe of the
output: an unbiased estimate of ``||J_i||_F^2``, the trace of the Gauss-Newton (Fisher) matrix of the output error
with respect to the unit's output. It says how much a unit of block error at step ``t`` moves the network output, so
weighting the block loss by ``F_t`` turns it into an estimate of the output error. This follows the idea of
Fisher-guided temporal calibration (AdaTSQ, arXiv 2602.09883: calibration data reweighted by per-timestep
sensitivity), in a form that fits block reconstruction; it is measured once per unit, before reconstructing it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import GACConfig
from .problem import UnitProblem
from .units import unit_output
from .weighting import SampleWeighting


class FisherWeighting(SampleWeighting):
    """Per-sample weight ``F_{t(i)}`` (normalised within the mini-batch); see the module docstring."""

    name = "fisher"

    def __init__(self, config: GACConfig, samples_per_step: int = 8):
        self.config = config
        self.samples_per_step = samples_per_step
        self.model: nn.Module | None = None

    def begin_model(self, model: nn.Module, data, validation_data=None, step_influence=None) -> None:
        self.model, self.data = model, data

    def begin_unit(self, problem: UnitProblem) -> None:
        generator = torch.Generator().manual_seed(problem.seed + 104723)
        steps = problem.timesteps.unique(sorted=True)
        picked = []
        for s in steps:
            members = problem.train_idx[problem.timesteps[problem.train_idx] == s]
            picked.append(members[torch.randperm(len(members), generator=generator)[: self.samples_per_step]])
        idx = torch.cat(picked)
        mask, local = problem.shard.local(idx)  # the picked samples this process holds
        values = self.output_sensitivity(problem.module, local, idx[mask], problem.seed)
        step_of = torch.searchsorted(steps, problem.timesteps[idx[mask]])
        sums = torch.zeros(len(steps), dtype=torch.float64).index_add_(0, step_of, values.double())
        counts = torch.zeros(len(steps), dtype=torch.float64).index_add_(0, step_of, torch.ones(len(values)).double())
        sums, counts = problem.shard.sum_all([sums, counts])
        fisher = (sums / counts.clamp_min(1)).float()
        self.step_fisher = fisher / fisher.mean().clamp_min(1e-30)
        self.sample_factor = self.step_fisher[torch.searchsorted(steps, problem.timesteps)]
        self.steps = steps

    def output_sensitivity(self, unit: nn.Module, local: torch.Tensor, global_idx: torch.Tensor,
                           seed: int) -> torch.Tensor:
        """``||J_i^T u_i||^2`` for this process's calibration samples ``local`` (``global_idx``: their global
        indices, which seed each sample's probe ``u_i``, so the estimate does not depend on the process holding it)."""
        model = self.model
        param = next(model.parameters())
        captured: list[torch.Tensor] = []

        def hook(module, args, out):
            h = unit_output(out).detach().requires_grad_(True)
            captured.append(h)
            return h if torch.is_tensor(out) else (h, *out[1:])

        values = []
        bs = max(self.config.batch_size, 64)
        handle = unit.register_forward_hook(hook)
        try:
            for i in range(0, len(local), bs):
                captured.clear()
                call = self.data.batch(local[i : i + bs], device=param.device, dtype=param.dtype)
                with torch.enable_grad():
                    out = unit_output(model(**call, return_dict=False))
                    probe = torch.stack([torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(seed + int(g)))
                                         for g in global_idx[i : i + bs]]).to(out)
                    (grad,) = torch.autograd.grad((out * probe).sum(), captured[0])
                values.append(grad.detach().float().pow(2).flatten(1).sum(1).cpu())
        finally:
            handle.remove()
        return torch.cat(values) if values else torch.zeros(0)

    def batch_weights(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        w = self.sample_factor[indices]
        return w / w.sum()

    def end_unit(self) -> dict[str, Any]:
        return {"fisher_per_timestep": {int(t): f.item() for t, f in zip(self.steps, self.step_fisher)}}
