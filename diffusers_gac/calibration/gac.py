"""Gradient-Aligned Calibration: per-sample weights learned by a meta-gradient (see docs/method.md).

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

Options beyond the paper (all off by default):

* ``gac_validation_target="output"``: the validation error is the denoiser's output error against the
  full-precision denoiser on the validation inputs, the unit's parameters replaced by theta' inside the whole
  network (earlier units quantized, later ones still in full precision), instead of the unit's own error;
* ``gac_timestep_importance="perturbation"``: each validation sample's error is multiplied by the importance of
  its sampler step for the final sample (``timestep_importance``), normalised to mean 1 over the calibration set.
  The measurement needs the scheduler: ``GradientAlignedWeighting(config, scheduler=...)``, passed to
  ``quantize_model(..., weighting=...)`` or ``reconstruct_model(..., scheduler=...)``;
* ``gac_importance_prior``: the logits start at the log importance (bounded), a fixed timestep weighting that
  the meta-steps may then move;
* ``gac_weight_granularity="timestep"``: one logit per sampler step instead of one per sample. With per-sample
  logits a meta-step's gradient reaches only the ``batch_size`` samples of its mini-batch, so 20 meta-steps touch
  each of ~1,600 samples less than once on average; per-step logits are all reached by nearly every meta-step.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import GACConfig
from ..sampling import denoise, fresh_scheduler, resolve_labels, sample_shape
from .problem import UnitProblem, contiguous_groups, per_sample_error
from .units import unit_output
from .weighting import SampleWeighting


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


@torch.no_grad()
def timestep_importance(denoiser: torch.nn.Module, scheduler, num_inference_steps: int, *, trajectories: int = 32,
                        scale: float = 0.05, seed: int = 0, only: torch.Tensor | None = None) -> dict[float, float]:
    """How much an error in the noise prediction at each sampler step moves the final sample.

    Runs the sampler (a fresh copy of ``scheduler``, deterministic steps) on ``trajectories`` seeded noises, once
    unperturbed and once per step ``k`` with ``scale * z`` (``z`` a fixed standard normal) added to the denoiser's
    output at step ``k``; the importance of step ``k`` is the mean squared change of the final sample divided by
    ``scale ** 2``. Returns ``{timestep value: importance}``; with ``only`` (the timesteps the calibration data
    holds), for the sampler steps nearest to those only: the others would cost a sampler run each and go unused.
    A class-conditional denoiser gets balanced labels.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = sample_shape(denoiser, trajectories)
    noise = torch.randn(shape, generator=generator)
    push = torch.randn(shape, generator=generator) * scale
    labels = resolve_labels(denoiser, trajectories, None)
    conditioning = {"class_labels": labels} if labels is not None else None
    sampler = fresh_scheduler(scheduler)

    def final_sample(perturbed_step: int | None) -> torch.Tensor:
        def perturb(k: int, t, model_input, out: torch.Tensor) -> torch.Tensor | None:
            return out + push.to(out) if k == perturbed_step else None

        return denoise(denoiser, sampler, noise, num_inference_steps=num_inference_steps, conditioning=conditioning,
                       on_step=perturb).float()

    base = final_sample(None)
    steps = [float(t) for t in sampler.timesteps]
    wanted = set(range(len(steps)))
    if only is not None:  # the sampler step nearest to each wanted timestep
        wanted = set((only.double()[:, None] - torch.tensor(steps, dtype=torch.float64)[None]).abs().argmin(1).tolist())
    return {t: ((final_sample(k) - base).pow(2).mean() / scale**2).item() for k, t in enumerate(steps) if k in wanted}


def importance_of(importance: dict[float, float], timesteps: torch.Tensor) -> torch.Tensor:
    """The importance of every sample's timestep (the nearest measured step), float64."""
    keys = torch.tensor(sorted(importance), dtype=torch.float64)
    values = torch.tensor([importance[k] for k in sorted(importance)], dtype=torch.float64)
    nearest = (timesteps.double()[:, None] - keys[None]).abs().argmin(1)
    return values[nearest]


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


class GradientAlignedWeighting(SampleWeighting):
    """Learned per-sample weights (see the module docstring); ``uniform`` is the special case of no meta-steps
    and no validation split."""

    name = "gradient_aligned"

    def __init__(self, config: GACConfig, scheduler=None):
        self.config = config
        self.scheduler = scheduler  # only for gac_timestep_importance
        self.generator = torch.Generator().manual_seed(config.seed + 7919)  # never disturbs the loop's sampling
        self.importance: dict[float, float] | None = None
        self.model: torch.nn.Module | None = None

    def begin_model(self, model: torch.nn.Module, data, validation_data=None) -> None:
        """Once per calibration, the model still in full precision: measure the timestep importance and the
        full-precision denoiser outputs that the options ask for."""
        cfg = self.config
        self.model = model
        if cfg.gac_timestep_importance == "perturbation":
            if self.scheduler is None:
                raise ValueError("gac_timestep_importance='perturbation' needs the scheduler: pass "
                                 "weighting=GradientAlignedWeighting(config, scheduler=scheduler) to quantize_model")
            self.importance = timestep_importance(model, self.scheduler, cfg.calib_num_inference_steps,
                                                  trajectories=cfg.gac_importance_trajectories,
                                                  scale=cfg.gac_importance_scale, seed=cfg.seed,
                                                  only=data.timesteps.unique())
        if cfg.gac_validation_target == "output":
            self.output_data = validation_data if validation_data is not None else data
            param = next(model.parameters())
            bs = max(cfg.batch_size, 64)
            outs = []
            with torch.no_grad():
                for i in range(0, len(self.output_data), bs):
                    call = self.output_data.batch(torch.arange(i, min(i + bs, len(self.output_data))),
                                                  device=param.device, dtype=param.dtype)
                    outs.append(unit_output(model(**call, return_dict=False)).cpu())
            self.output_target = torch.cat(outs)

    def output_loss(self, problem: UnitProblem):
        """Per-sample validation loss at the denoiser's output, ``params`` standing in for the unit's."""
        model, prefix = self.model, problem.name
        if model is None or model.get_submodule(prefix) is not problem.module:
            raise RuntimeError("gac_validation_target='output' needs begin_model(model, ...) with the unit's model")
        param = next(model.parameters())

        def loss(idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            call = self.output_data.batch(idx, device=param.device, dtype=param.dtype)
            full = {f"{prefix}.{k}": v for k, v in (params or {}).items()}
            out = torch.func.functional_call(model, full, (), {**call, "return_dict": False}, strict=False)
            return per_sample_error(unit_output(out), self.output_target[idx].to(param.device))

        return loss

    def sample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample logits from the learned ones (identity, or per-timestep logits expanded)."""
        return logits if self.config.gac_weight_granularity == "sample" else logits[self.sample_step]

    # -- the meta objective ---------------------------------------------------------------------------------
    def meta_objective(self, logits: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
                       problem: UnitProblem | None = None) -> torch.Tensor:
        """``L_val(s)`` for one training and one validation mini-batch, differentiable in ``logits``."""
        # double backward: fused attention kernels have no second derivative, the math kernel has
        with sdpa_kernel(SDPBackend.MATH):
            return self._meta_objective(logits, train_idx, val_idx, problem or self.problem)

    def _meta_objective(self, logits: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
                        problem: UnitProblem) -> torch.Tensor:
        cfg = self.config
        names = list(problem.params)
        theta = [problem.params[n] for n in names]
        weights = torch.softmax(self.sample_logits(logits)[train_idx] / cfg.gac_temperature, dim=0)
        train_loss = (weights.to(theta[0].dtype) * problem.per_sample_loss(train_idx)).sum()
        grads = torch.autograd.grad(train_loss, theta, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(theta, grads)]
        if cfg.gac_virtual_step == "normalized":
            rms = _flat(grads).pow(2).mean().add(1e-24).sqrt()
            grads = [g / rms for g in grads]
        virtual = {n: p - cfg.gac_virtual_lr * g for n, p, g in zip(names, theta, grads)}
        val_loss = self.val_loss_fn(val_idx, params=virtual)
        if self.val_factor is not None:
            val_loss = val_loss * self.val_factor[val_idx].to(val_loss)
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
        val_timesteps = problem.timesteps if problem.validation_loss is None else problem.validation_timesteps
        self.val_loss_fn = problem.validation_loss or problem.per_sample_loss
        if cfg.gac_validation_target == "output":
            self.val_loss_fn = self.output_loss(problem)
        self.val_factor = None
        if cfg.gac_timestep_importance != "none":
            if self.importance is None:
                raise RuntimeError("gac_timestep_importance needs begin_model(model, data) before begin_unit")
            scale = importance_of(self.importance, problem.timesteps).mean().clamp_min(1e-30)
            self.val_factor = (importance_of(self.importance, val_timesteps) / scale).float()
        steps, self.sample_step = problem.timesteps.unique(sorted=True, return_inverse=True)
        size = problem.num_samples if cfg.gac_weight_granularity == "sample" else len(steps)
        self.logits = torch.zeros(size)
        if cfg.gac_importance_prior:
            log_imp = importance_of(self.importance, problem.timesteps if size == problem.num_samples else steps)
            # weights proportional to the importance; with bounded logits the most important step sits at the upper
            # bound and a step less than e^(-2 bound / tau) times as important gets that floor
            log_imp = (log_imp.clamp_min(1e-12).log() - log_imp.max().clamp_min(1e-12).log()) * cfg.gac_temperature
            if cfg.gac_max_logit is not None:
                log_imp = (log_imp + cfg.gac_max_logit).clamp_min(-cfg.gac_max_logit)
            self.logits = log_imp.float()
        self.logits.requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.logits], lr=cfg.gac_meta_lr)
        self.trace: list[float] = []
        for _ in range(cfg.gac_meta_steps if len(self.val_idx) else 0):
            self.meta_step()

    def meta_step(self) -> None:
        cfg = self.config
        b = min(cfg.batch_size, len(self.train_idx))
        train = self.train_idx[torch.randperm(len(self.train_idx), generator=self.generator)[:b]]
        val = self.val_idx[torch.randperm(len(self.val_idx), generator=self.generator)[: max(b, 2 * cfg.gac_groups)]]
        objective = self.meta_objective(self.logits, train, val)  # on the math attention kernel, see there
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
        logits = self.sample_logits(self.logits.detach())[indices] / self.config.gac_temperature
        logits = logits.masked_fill(self.val_mask[indices], -math.inf)  # validation samples never train
        if torch.isinf(logits).all():
            return torch.full((len(indices),), 1.0 / len(indices))
        return torch.softmax(logits, dim=0)

    def learned_weights(self) -> torch.Tensor:
        """Normalised weight of every calibration sample (0 for validation samples)."""
        logits = (self.sample_logits(self.logits.detach()) / self.config.gac_temperature).masked_fill(self.val_mask, -math.inf)
        return torch.softmax(logits, dim=0)

    def end_unit(self) -> dict[str, Any]:
        w = self.learned_weights()
        timesteps = self.problem.timesteps
        mass = {int(t): w[timesteps == t].sum().item() for t in timesteps.unique()}
        train_w = w[self.train_idx]
        ess = (train_w.sum() ** 2 / train_w.pow(2).sum()).item() / max(1, len(train_w))
        out = {"meta_objective": self.trace, "weight_mass_per_timestep": mass, "effective_sample_fraction": ess,
               "validation_samples": len(self.val_idx)}
        if self.importance is not None:
            out["timestep_importance"] = self.importance
        return out
