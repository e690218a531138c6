"""Block reconstruction: for each unit in execution order, learn its rounding and activation steps.

For unit ``k`` the inputs come from the model with units ``< k`` already quantized, the targets from the
full-precision model; the loss is ``sum_i w_i * l_i`` with ``l_i`` the squared error summed over channels and
averaged over positions, and ``w`` from a ``SampleWeighting`` strategy. The strategy may hold some samples out as
its validation set: they never train the unit nor set its activation ranges, and the unit's error is reported on
both parts. Every random draw of a unit comes from a generator seeded by the calibration seed and the unit's index,
so a unit's result does not depend on how the units before it were reached (a resumed run ends the same).

Data-parallel (``shard``, see ``distributed.py``): each process holds its own calibration samples; mini-batches are
drawn over global sample indices alike on every process, each process takes the loss of the samples it holds and
the gradients of the unit's quantization parameters are summed over processes before every step, so all processes
hold the same quantizer state throughout. Activation ranges are set from the values all processes observed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn

from ..config import GACConfig
from ..quant.convert import act_quantizers, quantization_disabled, set_quant_state
from ..quant.levers import search_levers
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..sampling import progress_bar
from .data import CalibrationData
from .diagnostics import gradient_conflict
from .distributed import Shard
from .fisher import FisherWeighting
from .gac import GradientAlignedWeighting
from .resume import UnitCheckpoint
from .problem import UnitProblem, UnitReport, per_sample_error
from .units import (
    Unit,
    UnitCache,
    capture_unit_inputs,
    capture_unit_outputs,
    find_units,
    unit_output,
)
from .weighting import SampleWeighting, UniformWeighting

logger = logging.get_logger(__name__)

EVAL_SAMPLES = 256  # subset of the training samples on which a unit's error is reported before and after
LEVER_SAMPLES = 64  # training samples (evenly strided) whose layer inputs the lever search scores candidates on
LEVER_ELEMENTS = 2**25  # ... and at most this many input values per layer (128 MiB in float32)


def rounding_beta(step: int, iters: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """AdaRound's annealed exponent; None during the warm-up, when the regulariser is off."""
    warm = warmup * iters
    if step < warm:
        return None
    progress = (step - warm) / max(1.0, iters - warm)
    return end + (start - end) * max(0.0, 1.0 - progress)


def unit_seed(seed: int, index: int) -> int:
    """The seed of unit ``index``'s random draws: independent of what the units before it drew."""
    return (seed * 1_000_003 + 7_919 * (index + 1)) % (2**63 - 1)


def _model_calls(data: CalibrationData, batch_size: int, device, dtype) -> Iterator[tuple[dict[str, Any], int]]:
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        yield data.batch(idx, device=device, dtype=dtype), len(idx)


class UnitReconstruction:
    """Calibration of one unit; holds its cached inputs and targets (this process's samples; ``timesteps`` are
    theirs) and the strategy's view of it. ``shard`` places these samples among those of all processes."""

    def __init__(self, model: nn.Module, unit: Unit, cache: UnitCache, timesteps: torch.Tensor, config: GACConfig,
                 device, dtype, seed: int, shard: Shard | None = None):
        self.model, self.unit, self.cache, self.config = model, unit, cache, config
        self.timesteps, self.device, self.dtype, self.seed = timesteps, device, dtype, seed
        self.shard = shard or Shard.single(len(timesteps))
        self.global_timesteps = self.shard.rows(timesteps)  # every sample's, over all processes
        self.generator = torch.Generator().manual_seed(seed)
        self.context = getattr(model, "_gac_timestep_context", None)
        self.validation: UnitReconstruction | None = None  # a separate validation set, when one is given

    def check_names(self, params: dict[str, torch.Tensor]) -> None:
        """A stand-in for a name the unit does not have would be ignored silently: refuse it."""
        module = self.unit.module
        names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        unknown = sorted(set(params) - names)
        if unknown:
            raise KeyError(f"{self.unit.name} has no parameter or buffer named {unknown}")

    def run(self, idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The unit's output for calibration samples ``idx`` (on the compute device); ``params`` replaces some of
        the unit's parameters or buffers by name (``torch.func.functional_call``), for virtual updates."""
        if self.context is not None:
            self.context.set_timesteps(self.timesteps[idx])
        args, kwargs = self.cache.call_inputs(idx, self.device, self.dtype)
        if params is None:
            return unit_output(self.unit.module(*args, **kwargs))
        self.check_names(params)
        return unit_output(torch.func.functional_call(self.unit.module, params, tuple(args), kwargs, strict=False))

    def per_sample_loss(self, idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return per_sample_error(self.run(idx, params), self.cache.target[idx].to(self.device))

    @torch.no_grad()
    def mean_loss(self, idx: torch.Tensor) -> float | None:
        """The mean error over the global samples ``idx`` (over all processes)."""
        if not len(idx):
            return None
        _, local = self.shard.local(idx)
        bs = max(self.config.batch_size, 64)
        losses = [self.per_sample_loss(local[i : i + bs]) for i in range(0, len(local), bs)]
        if not self.shard.distributed:
            return torch.cat(losses).mean().item()
        total = torch.cat(losses).double().sum() if losses else torch.zeros((), dtype=torch.float64)
        return (self.shard.sum(total.reshape(1)) / len(idx)).item()

    @torch.no_grad()
    def fit_levers(self, idx: torch.Tensor) -> dict[str, dict]:
        """Search the smoothing and clipping of the unit's layers (``quant/levers.py``) on the inputs each layer sees
        for a strided subset of the global training samples ``idx``; returns what each layer chose."""
        layers = {n: l for n, l in self.unit.layers.items() if l.smooth is not None or l.lowrank_up is not None
                  or any(getattr(q, "clip", None) is not None for q in l.modules())}
        if not layers:
            return {}
        inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

        def recorder(name):
            def hook(module, args):
                if sum(x.numel() for x in inputs[name]) + args[0].numel() <= LEVER_ELEMENTS or not inputs[name]:
                    inputs[name].append(args[0].detach().clone())
            return hook

        handles = [layer.register_forward_pre_hook(recorder(n)) for n, layer in layers.items()]
        try:
            _, local = self.shard.local(idx)
            local = local[torch.linspace(0, len(local) - 1, min(LEVER_SAMPLES, len(local))).round().long()]
            bs = max(self.config.batch_size, 64)
            for i in range(0, len(local), bs):
                self.run(local[i : i + bs])
        finally:
            for h in handles:
                h.remove()
        reduce_max = (lambda t: self.shard.rows(t[None]).amax(0)) if self.shard.distributed else (lambda t: t)
        return {n: search_levers(layer, inputs[n], self.shard.sum, reduce_max) for n, layer in layers.items()}

    @torch.no_grad()
    def init_activation_ranges(self, idx: torch.Tensor) -> None:
        """Set the unit's activation ranges from the inputs of the global samples ``idx`` (the training samples)."""
        quantizers = act_quantizers(self.unit.module)
        if not quantizers:
            return
        for q in quantizers:
            q.start_observing()
        _, local = self.shard.local(idx)
        bs = max(self.config.batch_size, 64)
        for i in range(0, len(local), bs):
            self.run(local[i : i + bs])
        merge = self.shard.rows if self.shard.distributed else None
        for q in quantizers:
            q.finish_observing(merge)

    def trainable_params(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        rounding, steps = {}, {}
        for name, q in self.unit.module.named_modules():
            if isinstance(q, WeightQuantizer):
                layer = self.unit.module.get_submodule(name.rpartition(".")[0]) if "." in name else self.unit.module
                q.init_rounding(layer.weight)
                rounding[f"{name}.alpha"] = q.alpha
        for name, q in self.unit.module.named_modules():
            if isinstance(q, ActQuantizer) and q.scheme != "dynamic" and not q.fixed_range:
                q.scale.requires_grad_(True)
                steps[f"{name}.scale"] = q.scale
        return rounding, steps

    def refine_factors(self, problem: UnitProblem, weighting: SampleWeighting, train_idx: torch.Tensor) -> None:
        """Once the rounding is final, fit the unit's low-rank factors to what it leaves: ``iters // 4`` Adam steps
        (``lr_lowrank``; 0: the factors stay the SVD's) on the same weighted loss, the quantized residual fixed."""
        cfg = self.config
        layers = [l for l in self.unit.layers.values() if l.lowrank_up is not None]
        if not cfg.lr_lowrank or not layers:
            return
        factors = [t.requires_grad_(True) for l in layers for t in (l.lowrank_down, l.lowrank_up)]
        opt = torch.optim.Adam(factors, lr=cfg.lr_lowrank)
        batch = min(cfg.batch_size, len(train_idx))
        for _ in range(max(1, cfg.iters // 4)):
            idx = train_idx[torch.randint(0, len(train_idx), (batch,), generator=self.generator)]
            loss = problem.loss_sum(idx, weighting.batch_weights(idx, cfg.iters).to(self.device))
            opt.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            self.sum_grads(factors)
            opt.step()
        for f in factors:
            f.requires_grad_(False)
            f.grad = None

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """In a distributed calibration, give every process the gradient of the whole mini-batch."""
        if self.shard.distributed:
            grads = self.shard.sum_all([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            for p, g in zip(params, grads):
                p.grad = g

    def rounding(self, mode: str):
        """Context manager: the unit's weights rounded by ``mode`` (``"soft"`` learned rounding, ``"hard"`` the final
        choice with straight-through gradients) for the duration."""
        return _RoundingMode([l.weight_quantizer for l in self.unit.layers.values()], mode)

    def optimise(self, weighting: SampleWeighting, train_idx: torch.Tensor, val_idx: torch.Tensor) -> dict[str, Any]:
        cfg = self.config
        rounding, steps = self.trainable_params()
        groups = [{"params": list(rounding.values()), "lr": cfg.lr_round}]
        if steps:
            groups.append({"params": list(steps.values()), "lr": cfg.lr_act})
        opt = torch.optim.Adam(groups)
        validation = self.validation
        problem = UnitProblem(self.unit.name, self.unit.module, rounding, steps, self.global_timesteps,
                              self.per_sample_loss, train_idx=train_idx, val_idx=val_idx, seed=self.seed,
                              check_names=self.check_names, rounding=self.rounding, shard=self.shard,
                              validation_loss=validation.per_sample_loss if validation else None,
                              validation_timesteps=validation.global_timesteps if validation else None,
                              validation_shard=validation.shard if validation else None)
        conflict_before = gradient_conflict(problem, cfg.gac_groups, seed=self.seed)
        weighting.begin_unit(problem)
        batch = min(cfg.batch_size, len(train_idx))
        params = [*rounding.values(), *steps.values()]
        for step in range(cfg.iters):
            weighting.before_step(step)
            idx = train_idx[torch.randint(0, len(train_idx), (batch,), generator=self.generator)]
            weights = weighting.batch_weights(idx, step).to(self.device)
            loss = problem.loss_sum(idx, weights)
            beta = rounding_beta(step, cfg.iters, cfg.round_warmup)
            if beta is not None and cfg.round_reg_weight > 0 and self.shard.is_main:  # counted once over processes
                reg = sum(l.weight_quantizer.rounding_regularizer(beta) for l in self.unit.layers.values())
                loss = cfg.round_reg_weight * reg if loss is None else loss + cfg.round_reg_weight * reg
            opt.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            self.sum_grads(params)
            opt.step()
        conflict_after = gradient_conflict(problem, cfg.gac_groups, seed=self.seed)
        for layer in self.unit.layers.values():
            layer.weight_quantizer.rounding = "hard"
        for p in steps.values():
            p.requires_grad_(False)
        self.refine_factors(problem, weighting, train_idx)
        return {**weighting.end_unit(), "conflict_before": conflict_before, "conflict_after": conflict_after}


class _RoundingMode:
    def __init__(self, quantizers: list[WeightQuantizer], mode: str):
        self.quantizers, self.mode = quantizers, {"soft": "learned", "hard": "hard_ste"}[mode]

    def __enter__(self):
        self.saved = [q.rounding for q in self.quantizers]
        for q in self.quantizers:
            if q.rounding == "learned":
                q.rounding = self.mode
        return self

    def __exit__(self, *exc):
        for q, mode in zip(self.quantizers, self.saved):
            q.rounding = mode
        return False


def make_weighting(config: GACConfig) -> SampleWeighting:
    """The strategy ``config.weighting`` names."""
    strategies = {"uniform": UniformWeighting, "gradient_aligned": GradientAlignedWeighting, "fisher": FisherWeighting}
    return strategies[config.weighting](config)


def reconstruct_model(
    model: nn.Module,
    data: CalibrationData,
    config: GACConfig,
    *,
    weighting: SampleWeighting | None = None,
    validation_data: CalibrationData | None = None,
    show_progress: bool = True,
    state=None,
    checkpoint: UnitCheckpoint | None = None,
    step_influence: dict[float, float] | None = None,
) -> list[UnitReport]:
    """Calibrate a converted model unit by unit on ``data``; returns one report per unit.

    ``config.reconstruction == "none"`` only sets activation ranges (round-to-nearest weights).
    ``validation_data`` (optional) is a second set of denoiser inputs whose unit inputs and full-precision
    targets are captured like the training ones and offered to the weighting strategy as its validation set.
    ``state`` (an Accelerate ``PartialState`` or ``Accelerator``, several processes): data-parallel calibration,
    ``data`` and ``validation_data`` being this process's shards. ``checkpoint``: units it already holds are
    restored instead of reconstructed, and every unit finished is written to it (resume after an interruption).
    ``step_influence``: ``{timestep: influence}`` for ``gac_validation_weighting="sample_influence"``.
    """
    weighting = weighting or make_weighting(config)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    set_quant_state(model, weights=False, acts=False)
    units = find_units(model, data.batch(torch.arange(min(2, len(data))), device=device, dtype=dtype))
    shard = Shard.across_processes(len(data), state) if state is not None else Shard.single(len(data))
    val_shard = None
    if validation_data is not None:
        val_shard = (Shard.across_processes(len(validation_data), state) if state is not None
                     else Shard.single(len(validation_data)))
    extra = {"step_influence": step_influence} if step_influence is not None else {}
    weighting.begin_model(model, data, validation_data, **extra)
    capture_bs = max(config.batch_size, 64)
    reports: list[UnitReport] = []
    done = checkpoint.restore(units, model) if checkpoint is not None else []
    reports.extend(done)
    progress = progress_bar(len(units), "calibrating units", show_progress and shard.is_main)
    progress.update(len(done))
    for index, unit in enumerate(units[len(done):], start=len(done)):
        start = time.time()
        seed = unit_seed(config.seed, index)
        cache = capture_unit_cache(model, unit, data, capture_bs, device, dtype)
        set_quant_state(unit.module, weights=True, acts=False)
        job = UnitReconstruction(model, unit, cache, data.timesteps, config, device, dtype, seed, shard)
        if validation_data is not None:
            job.validation = UnitReconstruction(model, unit, capture_unit_cache(model, unit, validation_data, capture_bs,
                                                device, dtype), validation_data.timesteps, config, device, dtype, seed,
                                                val_shard)
        held_out = weighting.validation_mask(job.global_timesteps, torch.Generator().manual_seed(seed + 1))
        train_idx, val_idx = torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()
        chosen = job.fit_levers(train_idx)
        job.init_activation_ranges(train_idx)
        set_quant_state(unit.module, weights=True, acts=True)
        eval_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 2))]
        eval_idx = eval_idx[:EVAL_SAMPLES]
        before, val_before = job.mean_loss(eval_idx), job.mean_loss(val_idx)
        diagnostics = job.optimise(weighting, train_idx, val_idx) if config.reconstruction == "adaround" else {}
        report = UnitReport(unit.name, type(unit.module).__name__, len(unit.layers), before, job.mean_loss(eval_idx),
                            round(time.time() - start, 2), diagnostics, val_before, job.mean_loss(val_idx), chosen)
        reports.append(report)
        logger.info(f"{unit.name}: error {report.loss_before:.4g} -> {report.loss_after:.4g} ({report.seconds:.1f}s)")
        if checkpoint is not None:
            checkpoint.save(index, unit, report)
        del cache, job
        progress.update(1)
    progress.close()
    model.train(was_training)
    return reports


def capture_unit_cache(model: nn.Module, unit: Unit, data: CalibrationData, batch_size: int, device, dtype) -> UnitCache:
    """The unit's inputs under the current (partially quantized) model and its full-precision outputs."""
    cache = capture_unit_inputs(model, unit, _model_calls(data, batch_size, device, dtype))
    with quantization_disabled(model):
        cache.target = capture_unit_outputs(model, unit, _model_calls(data, batch_size, device, dtype))
    return cache


def reports_as_dicts(reports: list[UnitReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in reports]
