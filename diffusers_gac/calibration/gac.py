"""Gradient-Aligned Calibration: per-sample weights learned by a meta-gradient (docs/method.md, section 3).

For each unit, before reconstruction (or, with ``gac_meta_every > 0``, also during it):

1. split the unit's calibration samples into a training part and a timestep-balanced validation part (or, when
   the loop offers a separate validation set, e.g. from the quantized model's own trajectories, use that);
2. weights ``w = softmax(s / tau)`` over the samples of a training mini-batch, logits ``s`` starting equal;
3. a differentiable virtual update of the unit's quantization parameters theta (AdaRound variables and
   activation step sizes), ``theta' = theta - eta * d(sum_i w_i l_i)/d theta`` (``gac_virtual_step="sgd"``), or
   with that gradient divided by its root mean square (``"normalized"``, an Adam-like step whose size does not
   depend on the loss scale);
4. the validation objective at theta': ``L_val = mean validation error + gac_gm_weight * L_gm`` where
   ``L_gm = - mean over pairs of timestep groups (t, k) of sim(G_t, G_k)``, ``G_t`` the gradient of group t's
   validation error with respect to the AdaRound variables at theta' (``sim`` is the dot product, as in the
   paper, or the cosine); ``s`` moves down the exact gradient of ``L_val`` (autograd through the virtual step,
   Hessian-vector products included), with Adam.

Which ``G_t``: the gradient with respect to theta' (not to the sample weights). Everything is differentiated
exactly; ``tests/test_gac.py`` checks the meta-gradient against finite differences.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import GACConfig
from .weighting import SampleWeighting, UnitProblem


def contiguous_groups(timesteps: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Group index of every sample: the distinct timesteps, sorted, cut into ``num_groups`` contiguous bands."""
    distinct = timesteps.unique(sorted=True)
    num_groups = max(1, min(num_groups, len(distinct)))
    band = torch.div(torch.arange(len(distinct)) * num_groups, len(distinct), rounding_mode="floor")
    return band[torch.searchsorted(distinct, timesteps)]


def balanced_validation_split(timesteps: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of validation samples: ``fraction`` of the samples of every distinct timestep (at least one
    where a timestep has two or more samples)."""
    mask = torch.zeros(len(timesteps), dtype=torch.bool)
    if fraction <= 0:
        return mask
    for t in timesteps.unique():
        idx = torch.nonzero(timesteps == t).flatten()
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        if k > 0:
            mask[idx[torch.randperm(len(idx), generator=generator)[:k]]] = True
    return mask


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


class GradientAlignedWeighting(SampleWeighting):
    """Learned per-sample weights (see the module docstring); ``uniform`` is the special case of no meta-steps
    and no validation split."""

    name = "gradient_aligned"

    def __init__(self, config: GACConfig):
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed + 7919)  # never disturbs the loop's sampling

    # -- the meta objective ---------------------------------------------------------------------------------
    def meta_objective(self, logits: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
                       problem: UnitProblem | None = None) -> torch.Tensor:
        """``L_val(s)`` for one training and one validation mini-batch, differentiable in ``logits``."""
        cfg, problem = self.config, problem or self.problem
        names = list(problem.params)
        theta = [problem.params[n] for n in names]
        weights = torch.softmax(logits[train_idx] / cfg.gac_temperature, dim=0)
        train_loss = (weights.to(theta[0].dtype) * problem.per_sample_loss(train_idx)).sum()
        grads = torch.autograd.grad(train_loss, theta, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(theta, grads)]
        if cfg.gac_virtual_step == "normalized":
            rms = _flat(grads).pow(2).mean().add(1e-24).sqrt()
            grads = [g / rms for g in grads]
        virtual = {n: p - cfg.gac_virtual_lr * g for n, p, g in zip(names, theta, grads)}
        val_loss = (problem.validation_loss or problem.per_sample_loss)(val_idx, params=virtual)
        objective = val_loss.mean()
        if cfg.gac_gm_weight > 0:
            objective = objective + cfg.gac_gm_weight * self.gradient_matching(val_loss, val_idx, virtual, problem)
        return objective

    def gradient_matching(self, val_loss: torch.Tensor, val_idx: torch.Tensor, virtual: dict[str, torch.Tensor],
                          problem: UnitProblem) -> torch.Tensor:
        """``- mean_{t<k} sim(G_t, G_k)`` over the timestep groups present in the validation batch."""
        rounding = [virtual[n] for n in problem.rounding_params]
        groups = self.val_groups[val_idx]
        per_group = []
        for g in groups.unique():
            sel = groups == g
            grads = torch.autograd.grad(val_loss[sel].mean(), rounding, create_graph=True, allow_unused=True)
            per_group.append(_flat([torch.zeros_like(r) if x is None else x for r, x in zip(rounding, grads)]))
        if len(per_group) < 2:
            return val_loss.new_zeros(())
        sims = []
        for a, b in itertools.combinations(per_group, 2):
            sim = (a * b).sum()
            if self.config.gac_gm_form == "cosine":
                sim = sim / (a.norm() * b.norm() + 1e-12)
            sims.append(sim)
        return -torch.stack(sims).mean()

    # -- the strategy ---------------------------------------------------------------------------------------
    def begin_unit(self, problem: UnitProblem) -> None:
        cfg = self.config
        self.problem = problem
        if problem.validation_loss is not None:  # a separate validation set: every calibration sample trains
            self.val_mask = torch.zeros(problem.num_samples, dtype=torch.bool)
            self.val_idx = torch.arange(len(problem.validation_timesteps))
            self.val_groups = contiguous_groups(problem.validation_timesteps, cfg.gac_groups)
        else:
            self.val_mask = balanced_validation_split(problem.timesteps, cfg.gac_val_fraction, self.generator)
            self.val_idx = torch.nonzero(self.val_mask).flatten()
            self.val_groups = contiguous_groups(problem.timesteps, cfg.gac_groups)
        self.train_idx = torch.nonzero(~self.val_mask).flatten()
        self.logits = torch.zeros(problem.num_samples, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=cfg.gac_meta_lr)
        self.trace: list[float] = []
        for _ in range(cfg.gac_meta_steps if len(self.val_idx) else 0):
            self.meta_step()

    def meta_step(self) -> None:
        cfg = self.config
        b = min(cfg.batch_size, len(self.train_idx))
        train = self.train_idx[torch.randperm(len(self.train_idx), generator=self.generator)[:b]]
        val = self.val_idx[torch.randperm(len(self.val_idx), generator=self.generator)[: max(b, 2 * cfg.gac_groups)]]
        # double backward: fused attention kernels have no second derivative, the math kernel has
        with sdpa_kernel(SDPBackend.MATH):
            objective = self.meta_objective(self.logits, train, val)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward(inputs=[self.logits])
        self.optimizer.step()
        if cfg.gac_max_logit is not None:  # bounded weights: no sample outweighs another by more than e^(2 bound / tau)
            with torch.no_grad():
                self.logits.clamp_(-cfg.gac_max_logit, cfg.gac_max_logit)
        self.trace.append(objective.item())

    def batch_weights(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        every = self.config.gac_meta_every
        if every and step and step % every == 0 and len(self.val_idx):
            self.meta_step()
        logits = self.logits.detach()[indices] / self.config.gac_temperature
        logits = logits.masked_fill(self.val_mask[indices], -math.inf)  # validation samples never train
        if torch.isinf(logits).all():
            return torch.full((len(indices),), 1.0 / len(indices))
        return torch.softmax(logits, dim=0)

    def learned_weights(self) -> torch.Tensor:
        """Normalised weight of every calibration sample (0 for validation samples)."""
        logits = (self.logits.detach() / self.config.gac_temperature).masked_fill(self.val_mask, -math.inf)
        return torch.softmax(logits, dim=0)

    def end_unit(self) -> dict[str, Any]:
        w = self.learned_weights()
        timesteps = self.problem.timesteps
        mass = {int(t): w[timesteps == t].sum().item() for t in timesteps.unique()}
        train_w = w[self.train_idx]
        ess = (train_w.sum() ** 2 / train_w.pow(2).sum()).item() / max(1, len(train_w))
        return {"meta_objective": self.trace, "weight_mass_per_timestep": mass, "effective_sample_fraction": ess,
                "validation_samples": len(self.val_idx)}
