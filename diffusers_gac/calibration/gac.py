"""Gradient-Aligned Calibration (GAC): sample weights for block reconstruction, learned by a meta-gradient.

Every calibration sample ``i`` of a unit gets a logit ``s``: one per sampler step by default
(``gac_weight_granularity="timestep"``: a step's samples share it), or one per sample as in the paper
(``"sample"``). In a reconstruction mini-batch, sample ``i`` weighs ``softmax(s / tau)_i`` over the batch. A share of
the samples (``gac_val_fraction``, balanced over timesteps) is held out as the validation set; it never trains the
unit, nor sets its activation ranges. A meta-step moves the logits:

1. a training mini-batch that holds every sampler step at least once, and a virtual update of the unit's
   quantization parameters theta (AdaRound variables, learned activation step sizes) on it:
   ``theta' = theta - eta * g``, ``g`` the gradient of ``sum_i w_i(s) l_i(theta)``, divided by its root mean square
   (``gac_virtual_step="normalized"``; ``"sgd"`` uses it raw);
2. the validation objective at theta', ``L_val = mean_v l_v(theta') + gac_gm_weight * L_gm(theta')`` with
   ``L_gm = - mean over pairs of timestep groups (t, k) of sim(G_t, G_k)``, ``G_t`` the gradient of group t's
   validation error with respect to theta' (the AdaRound variables, and the activation step sizes where the scheme
   learns them: ``static`` and ``timestep`` ranges that every timestep shares; ``sim``: cosine, or the paper's dot
   product).
   With ``gac_val_rounding="hard"`` the validation pass rounds the weights as reconstruction will in the end
   (``h(alpha) >= 0.5``, straight-through gradients), so the objective holds the rounding error that reconstruction
   fights; ``"soft"`` uses AdaRound's soft rounding, as the paper's meta phase does;
3. the logits step down the exact gradient of ``L_val`` (autograd through the virtual step, Hessian-vector products
   included; ``tests/test_gac.py`` checks it against finite differences) with Adam, bounded by ``gac_max_logit``.

When: ``gac_meta_steps`` meta-steps before the unit's reconstruction (the paper's order: weights then frozen), and
one every ``gac_meta_every`` reconstruction steps once AdaRound's warm-up is over, when the rounding variables have
moved and the rounding regulariser starts to bind. The defaults (per-step logits, interleaved meta-steps, hard
rounding in the validation pass) reach every logit at every meta-step; ``GACConfig.paper(...)`` gives the paper's
formulation (per-sample logits, 20 meta-steps before reconstruction, soft rounding).

``gac_validation_target="output"`` measures the validation error at the denoiser's output instead of the unit's
(the unit's virtually updated parameters placed inside the whole network; later units still in full precision).
``gac_validation="quantized_trajectories"`` takes the validation inputs from the round-to-nearest quantized
model's own trajectories (a separate set; then every calibration sample trains).
``gac_validation_weighting="sample_influence"`` weights each validation sample's error in the first term of
``L_val`` by its sampler step's influence on the end of the trajectory (``calibration/influence.py``): the plain mean
rewards the steps whose unit errors are largest, the last ones, whose errors barely reach the samples.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import GACConfig
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


def covering_batch(pool: torch.Tensor, steps: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``max(size, distinct steps)`` indices from ``pool`` holding every distinct value of ``steps[pool]`` at least
    once (one random sample per step), filled up with random others."""
    pool_steps = steps[pool]
    first = []
    for s in pool_steps.unique():
        members = pool[pool_steps == s]
        first.append(members[torch.randint(len(members), (1,), generator=generator)])
    chosen = torch.cat(first)
    rest = pool[~torch.isin(pool, chosen)]
    extra = rest[torch.randperm(len(rest), generator=generator)[: max(0, size - len(chosen))]]
    return torch.cat([chosen, extra])


def influence_of(step_influence: dict[float, float] | None, timesteps: torch.Tensor) -> torch.Tensor:
    """Every sample's step influence (``calibration/influence.py``), looked up by its timestep."""
    if step_influence is None:
        raise RuntimeError("gac_validation_weighting='sample_influence' needs the step influence, measured by the "
                           "calibration flow from a scheduler or a sampler; none was given")
    keys, values = torch.tensor(sorted(step_influence.items()), dtype=torch.float64).unbind(1)
    nearest = (timesteps.double()[:, None] - keys[None]).abs().argmin(1)
    off = (timesteps.double() - keys[nearest]).abs() > 1e-3 * keys.abs().max().clamp_min(1)
    if off.any():
        raise ValueError(f"no step influence was measured at timestep {timesteps[off][0].item():g} (measured at "
                         f"{', '.join(f'{k:g}' for k in keys.tolist())})")
    return values[nearest]


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


class GradientAlignedWeighting(SampleWeighting):
    """Learned sample weights (see the module docstring); with no meta-steps they stay uniform."""

    name = "gradient_aligned"

    def __init__(self, config: GACConfig):
        self.config = config
        self.model: torch.nn.Module | None = None
        self.step_influence: dict[float, float] | None = None  # for gac_validation_weighting="sample_influence"
        self.val_factor: torch.Tensor | None = None  # each validation sample's weight in L_val (set per unit)

    # -- once per calibration ---------------------------------------------------------------------------------
    def begin_model(self, model: torch.nn.Module, data, validation_data=None, step_influence=None) -> None:
        """The model still in full precision: keep what the options need (full-precision denoiser outputs, the
        step influence)."""
        cfg = self.config
        self.model = model
        self.step_influence = step_influence if step_influence is not None else self.step_influence
        self.separate_validation = validation_data is not None
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

    def validation_mask(self, timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if getattr(self, "separate_validation", False):  # validation inputs of their own: every sample trains
            return torch.zeros(len(timesteps), dtype=torch.bool)
        return balanced_validation_split(timesteps, self.config.gac_val_fraction, generator)

    def output_loss(self, problem: UnitProblem):
        """Per-sample validation loss at the denoiser's output, ``params`` standing in for the unit's."""
        model, prefix = self.model, problem.name
        if model is None or model.get_submodule(prefix) is not problem.module:
            raise RuntimeError("gac_validation_target='output' needs begin_model(model, ...) with the unit's model")
        param = next(model.parameters())

        def loss(idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            call = self.output_data.batch(idx, device=param.device, dtype=param.dtype)
            full = {f"{prefix}.{k}": v for k, v in (params or {}).items()}
            problem.check_names(params or {})
            out = torch.func.functional_call(model, full, (), {**call, "return_dict": False}, strict=False)
            return per_sample_error(unit_output(out), self.output_target[idx].to(param.device))

        return loss

    # -- the meta objective -----------------------------------------------------------------------------------
    def sample_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample logits from the learned ones (identity, or per-step logits expanded)."""
        return logits if self.config.gac_weight_granularity == "sample" else logits[self.sample_step]

    def meta_gradient(self, logits: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
                      problem: UnitProblem | None = None) -> tuple[float, torch.Tensor]:
        """``(L_val(s), dL_val/ds)`` for one training and one validation batch (global indices), over all processes.

        Computed in stages so that every sum over samples is a sum over processes: the weighted training gradient
        ``g = sum_r g_r(s)``; the virtual step ``theta' = theta - eta N(g)``; the validation objective's gradient at
        theta', ``grad F = sum_r grad F_r`` (its gradient-matching part through Hessian-vector products of each
        group's gradient); ``u = -eta J_N(g)^T grad F``; and ``dL/ds = sum_r (dg_r/ds)^T u``. With one process this is
        the exact gradient of the composed objective (``tests/test_gac.py`` checks it against finite differences).
        """
        # double backward: fused attention kernels have no second derivative, the math kernel has
        with sdpa_kernel(SDPBackend.MATH):
            return self._meta_gradient(logits, train_idx, val_idx, problem or self.problem)

    def _meta_gradient(self, logits: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor,
                       problem: UnitProblem) -> tuple[float, torch.Tensor]:
        cfg, shard = self.config, problem.shard
        names = list(problem.params)
        theta = [problem.params[n] for n in names]
        logits = logits.detach().requires_grad_(True)
        weights = torch.softmax(self.sample_logits(logits)[train_idx] / cfg.gac_temperature, dim=0)
        local_loss = problem.loss_sum(train_idx, weights.to(theta[0].dtype))
        local_grads = [None] * len(theta)
        if local_loss is not None:
            local_grads = list(torch.autograd.grad(local_loss, theta, create_graph=True, allow_unused=True))
        g = shard.sum_all([torch.zeros_like(p) if x is None else x.detach() for p, x in zip(theta, local_grads)])
        g_leaf = [x.clone().requires_grad_(True) for x in g]
        step = g_leaf
        if cfg.gac_virtual_step == "normalized":
            rms = _flat(g_leaf).pow(2).mean().add(1e-24).sqrt()
            step = [x / rms for x in g_leaf]
        leaves = [(p.detach() - cfg.gac_virtual_lr * x.detach()).requires_grad_(True) for p, x in zip(theta, step)]
        value, grad_f = self._validation(val_idx, dict(zip(names, leaves)), problem)
        u = torch.autograd.grad(step, g_leaf, grad_outputs=[-cfg.gac_virtual_lr * x for x in grad_f])
        with_graph = [(x, v) for x, v in zip(local_grads, u) if x is not None and x.requires_grad]
        meta = torch.zeros_like(logits)
        if with_graph:
            (meta,) = torch.autograd.grad([x for x, _ in with_graph], logits, grad_outputs=[v for _, v in with_graph],
                                          allow_unused=True)
            meta = torch.zeros_like(logits) if meta is None else meta
        return value, shard.sum(meta)

    def _validation(self, val_idx: torch.Tensor, virtual: dict[str, torch.Tensor],
                    problem: UnitProblem) -> tuple[float, list[torch.Tensor]]:
        """``F(theta') = mean validation error + gm_weight * L_gm`` and its gradient with respect to theta'
        (``virtual``: leaf tensors), both over all processes."""
        cfg = self.config
        separate = problem.validation_loss is not None
        shard = problem.validation_shard if separate else problem.shard
        leaves = list(virtual.values())
        zeros = [torch.zeros_like(x) for x in leaves]
        mask, local = shard.local(val_idx)
        gm = cfg.gac_gm_weight > 0
        with problem.rounding(cfg.gac_val_rounding):
            losses = self.val_loss_fn(local, params=virtual) if mask.any() else None
            value = None
            if losses is not None:  # the gradient-matching term below compares directions: it keeps the plain losses
                factor = 1 if self.val_factor is None else self.val_factor[val_idx[mask]].to(losses)
                value = (losses * factor).sum() / len(val_idx)
            grad = zeros
            if value is not None:
                grad = [z if x is None else x for z, x in zip(zeros, torch.autograd.grad(
                    value, leaves, retain_graph=gm, allow_unused=True))]
            total = shard.sum(torch.stack([value.detach() if value is not None else torch.zeros(())]).double())
            grad = shard.sum_all(grad)
            if gm:
                term, gm_grad = self._gradient_matching(losses, val_idx, mask, virtual, problem, shard)
                total = total + cfg.gac_gm_weight * term
                grad = [x + cfg.gac_gm_weight * y for x, y in zip(grad, gm_grad)]
        return total.item(), grad

    def _gradient_matching(self, losses: torch.Tensor | None, val_idx: torch.Tensor, mask: torch.Tensor,
                           virtual: dict[str, torch.Tensor], problem: UnitProblem, shard) -> tuple[float, list]:
        """``L_gm = - mean_{t<k} sim(G_t, G_k)`` over the timestep groups of the validation batch, ``G_t`` the gradient
        of group t's mean validation error with respect to theta' (rounding variables and learned step sizes), and its
        gradient with respect to theta' (Hessian-vector products of each process's part of ``G_t``)."""
        leaves = list(virtual.values())
        groups = self.val_groups[val_idx]
        local_groups = groups[mask]
        parts, graphs = [], []
        for g in groups.unique():
            count = int((groups == g).sum())
            sel = local_groups == g
            part = None
            if losses is not None and sel.any():
                part = torch.autograd.grad(losses[sel].sum() / count, leaves, create_graph=True, allow_unused=True)
                part = [torch.zeros_like(r) if x is None else x for r, x in zip(leaves, part)]
            graphs.append(part)
            parts.append(_flat([x.detach() for x in part]) if part is not None else
                         torch.zeros(sum(r.numel() for r in leaves), dtype=leaves[0].dtype))
        if len(parts) < 2:
            return 0.0, [torch.zeros_like(x) for x in leaves]
        group_grads = [x.clone().requires_grad_(True) for x in shard.sum_all(parts)]
        sims = []
        for a, b in itertools.combinations(group_grads, 2):
            sim = (a * b).sum()
            if self.config.gac_gm_form == "cosine":
                sim = sim / (a.norm() * b.norm() + 1e-12)
            sims.append(sim)
        term = -torch.stack(sims).mean()
        coefficients = torch.autograd.grad(term, group_grads)
        outputs, grad_outputs = [], []
        for part, c in zip(graphs, coefficients):
            if part is not None:
                offset = 0
                for x in part:
                    outputs.append(x)
                    grad_outputs.append(c[offset : offset + x.numel()].view_as(x))
                    offset += x.numel()
        hvp = [None] * len(leaves)
        if outputs:
            hvp = torch.autograd.grad(outputs, leaves, grad_outputs=grad_outputs, allow_unused=True)
        return term.item(), shard.sum_all([torch.zeros_like(x) if h is None else h for x, h in zip(leaves, hvp)])

    # -- the strategy -----------------------------------------------------------------------------------------
    def begin_unit(self, problem: UnitProblem) -> None:
        cfg = self.config
        self.problem = problem
        self.generator = torch.Generator().manual_seed(problem.seed + 7919)  # never disturbs the loop's sampling
        if problem.validation_loss is not None:  # a separate validation set
            self.val_idx = torch.arange(len(problem.validation_timesteps))
            self.val_groups = contiguous_groups(problem.validation_timesteps, cfg.gac_groups)
            self.val_loss_fn = problem.validation_loss
        else:
            self.val_idx = problem.val_idx
            self.val_groups = contiguous_groups(problem.timesteps, cfg.gac_groups)
            self.val_loss_fn = problem.per_sample_loss
        if cfg.gac_validation_target == "output":
            self.val_loss_fn = self.output_loss(problem)
        self.val_factor = None
        if cfg.gac_validation_weighting == "sample_influence":
            timesteps = problem.validation_timesteps if problem.validation_loss is not None else problem.timesteps
            factor = influence_of(self.step_influence, timesteps)
            self.val_factor = factor / factor[self.val_idx].mean().clamp_min(1e-30)
        steps, self.sample_step = problem.timesteps.unique(sorted=True, return_inverse=True)
        size = problem.num_samples if cfg.gac_weight_granularity == "sample" else len(steps)
        self.logits = torch.zeros(size, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=cfg.gac_meta_lr)
        self.trace: list[float] = []
        self.updates = torch.zeros(size, dtype=torch.long)  # meta-steps whose gradient reached each logit
        self.meta_start = math.ceil(cfg.round_warmup * cfg.iters)
        for _ in range(cfg.gac_meta_steps if len(self.val_idx) else 0):
            self.meta_step()

    def meta_step(self) -> None:
        cfg = self.config
        train = covering_batch(self.problem.train_idx, self.sample_step, cfg.batch_size, self.generator)
        val = self.val_idx
        if len(val) > 4 * cfg.batch_size:  # a large separate validation set: a covering subset per meta-step
            val = covering_batch(val, self.val_groups, 4 * cfg.batch_size, self.generator)
        value, grad = self.meta_gradient(self.logits, train, val)
        self.logits.grad = grad.to(self.logits)
        self.updates += (grad != 0).long()
        self.optimizer.step()
        if cfg.gac_max_logit is not None:  # bounded weights: no sample outweighs another by more than e^(2 bound / tau)
            with torch.no_grad():
                self.logits.clamp_(-cfg.gac_max_logit, cfg.gac_max_logit)
        self.trace.append(value)

    def before_step(self, step: int) -> None:
        every = self.config.gac_meta_every
        if every and step >= self.meta_start and (step - self.meta_start) % every == 0 and len(self.val_idx):
            self.meta_step()

    def batch_weights(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        logits = self.sample_logits(self.logits.detach())[indices] / self.config.gac_temperature
        return torch.softmax(logits, dim=0)

    def learned_weights(self) -> torch.Tensor:
        """Normalised weight of every training sample (a batch holding all of them), 0 for validation samples."""
        w = torch.zeros(self.problem.num_samples)
        train = self.problem.train_idx
        w[train] = torch.softmax(self.sample_logits(self.logits.detach())[train] / self.config.gac_temperature, 0)
        return w

    def end_unit(self) -> dict[str, Any]:
        w = self.learned_weights()
        timesteps = self.problem.timesteps
        mass = {int(t): w[timesteps == t].sum().item() for t in timesteps.unique()}
        train_w = w[self.problem.train_idx]
        ess = (train_w.sum() ** 2 / train_w.pow(2).sum()).item() / max(1, len(train_w))
        return {
            "meta_objective": self.trace,
            "weight_mass_per_timestep": mass,
            "effective_sample_fraction": ess,
            "max_min_weight_ratio": (train_w.max() / train_w.min()).item(),
            "logit_updates": {"min": int(self.updates.min()), "mean": float(self.updates.float().mean()),
                              "max": int(self.updates.max()), "logits": len(self.updates)},
            "validation_samples": len(self.val_idx),
        }
