"""Block reconstruction: for each unit in execution order, learn its rounding and activation steps.

For unit ``k`` the inputs come from the model with units ``< k`` already quantized, the targets from the
full-precision model; the loss is ``sum_i w_i * l_i`` with ``l_i`` the squared error summed over channels and
averaged over positions, and ``w`` from a ``SampleWeighting`` strategy. State is explicit per unit
(``UnitReport``) and calibration samples are read by index, so the loop can be sharded or resumed later.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn

from ..config import GACConfig
from ..quant.convert import act_quantizers, quantization_disabled, set_quant_state
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..sampling import progress_bar
from .data import CalibrationData
from .diagnostics import gradient_conflict
from .gac import GradientAlignedWeighting
from .problem import UnitProblem, per_sample_error
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

EVAL_SAMPLES = 256  # fixed subset on which a unit's error is reported before and after reconstruction


def rounding_beta(step: int, iters: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """AdaRound's annealed exponent; None during the warm-up, when the regulariser is off."""
    warm = warmup * iters
    if step < warm:
        return None
    progress = (step - warm) / max(1.0, iters - warm)
    return end + (start - end) * max(0.0, 1.0 - progress)


@dataclass
class UnitReport:
    name: str
    kind: str
    layers: int
    loss_before: float
    loss_after: float
    seconds: float
    weighting: dict[str, Any] = field(default_factory=dict)


def _model_calls(data: CalibrationData, batch_size: int, device, dtype) -> Iterator[tuple[dict[str, Any], int]]:
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        yield data.batch(idx, device=device, dtype=dtype), len(idx)


class UnitReconstruction:
    """Calibration of one unit; holds its cached inputs, targets and the strategy's view of it."""

    def __init__(self, model: nn.Module, unit: Unit, cache: UnitCache, timesteps: torch.Tensor, config: GACConfig,
                 device, dtype, generator: torch.Generator):
        self.model, self.unit, self.cache, self.config = model, unit, cache, config
        self.timesteps, self.device, self.dtype, self.generator = timesteps, device, dtype, generator
        self.context = getattr(model, "_gac_timestep_context", None)
        self.validation: UnitReconstruction | None = None  # a separate validation set, when one is given

    def run(self, idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The unit's output for calibration samples ``idx`` (on the compute device); ``params`` replaces some of
        the unit's parameters or buffers by name (``torch.func.functional_call``), for virtual updates."""
        if self.context is not None:
            self.context.set_timesteps(self.timesteps[idx])
        args, kwargs = self.cache.call_inputs(idx, self.device, self.dtype)
        if params is None:
            return unit_output(self.unit.module(*args, **kwargs))
        return unit_output(torch.func.functional_call(self.unit.module, params, tuple(args), kwargs, strict=False))

    def per_sample_loss(self, idx: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return per_sample_error(self.run(idx, params), self.cache.target[idx].to(self.device))

    @torch.no_grad()
    def mean_loss(self, idx: torch.Tensor) -> float:
        bs = max(self.config.batch_size, 64)
        return torch.cat([self.per_sample_loss(idx[i : i + bs]) for i in range(0, len(idx), bs)]).mean().item()

    @torch.no_grad()
    def init_activation_ranges(self) -> None:
        quantizers = act_quantizers(self.unit.module)
        if not quantizers:
            return
        for q in quantizers:
            q.start_observing()
        n = len(self.cache)
        bs = max(self.config.batch_size, 64)
        for i in range(0, n, bs):
            self.run(torch.arange(i, min(i + bs, n)))
        for q in quantizers:
            q.finish_observing()

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

    def optimise(self, weighting: SampleWeighting) -> dict[str, Any]:
        cfg = self.config
        rounding, steps = self.trainable_params()
        groups = [{"params": list(rounding.values()), "lr": cfg.lr_round}]
        if steps:
            groups.append({"params": list(steps.values()), "lr": cfg.lr_act})
        opt = torch.optim.Adam(groups)
        problem = UnitProblem(self.unit.name, self.unit.module, rounding, steps, self.timesteps, self.per_sample_loss)
        if self.validation is not None:
            problem.validation_loss = self.validation.per_sample_loss
            problem.validation_timesteps = self.validation.timesteps
        conflict_before = gradient_conflict(problem, cfg.gac_groups, seed=cfg.seed)
        weighting.begin_unit(problem)
        n = len(self.cache)
        for step in range(cfg.iters):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=self.generator)
            weights = weighting.batch_weights(idx, step).to(self.device)
            loss = (weights * self.per_sample_loss(idx)).sum()
            beta = rounding_beta(step, cfg.iters, cfg.round_warmup)
            if beta is not None and cfg.round_reg_weight > 0:
                reg = sum(l.weight_quantizer.rounding_regularizer(beta) for l in self.unit.layers.values())
                loss = loss + cfg.round_reg_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        conflict_after = gradient_conflict(problem, cfg.gac_groups, seed=cfg.seed)
        for layer in self.unit.layers.values():
            layer.weight_quantizer.rounding = "hard"
        for p in steps.values():
            p.requires_grad_(False)
        return {**weighting.end_unit(), "conflict_before": conflict_before, "conflict_after": conflict_after}


def make_weighting(config: GACConfig, scheduler: Any = None) -> SampleWeighting:
    """The strategy ``config.weighting`` names (``scheduler``: for strategies that sample, see ``gac.py``)."""
    if config.weighting == "gradient_aligned":
        return GradientAlignedWeighting(config, scheduler=scheduler)
    return UniformWeighting(config)


def reconstruct_model(
    model: nn.Module,
    data: CalibrationData,
    config: GACConfig,
    *,
    weighting: SampleWeighting | None = None,
    validation_data: CalibrationData | None = None,
    scheduler: Any = None,
    show_progress: bool = True,
) -> list[UnitReport]:
    """Calibrate a converted model unit by unit on ``data``; returns one report per unit.

    ``config.reconstruction == "none"`` only sets activation ranges (round-to-nearest weights).
    ``validation_data`` (optional) is a second set of denoiser inputs whose unit inputs and full-precision
    targets are captured like the training ones and offered to the weighting strategy as its validation set.
    ``scheduler`` (optional) is handed to the strategy ``config.weighting`` names when ``weighting`` is not given
    (``gac_timestep_importance`` samples with it).
    """
    weighting = weighting or make_weighting(config, scheduler=scheduler)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator().manual_seed(config.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    set_quant_state(model, weights=False, acts=False)
    units = find_units(model, data.batch(torch.arange(min(2, len(data))), device=device, dtype=dtype))
    weighting.begin_model(model, data, validation_data)
    eval_idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:EVAL_SAMPLES]
    timesteps = data.timesteps
    capture_bs = max(config.batch_size, 64)
    reports: list[UnitReport] = []
    progress = progress_bar(len(units), "calibrating units", show_progress)
    for unit in units:
        start = time.time()
        cache = capture_unit_cache(model, unit, data, capture_bs, device, dtype)
        set_quant_state(unit.module, weights=True, acts=False)
        job = UnitReconstruction(model, unit, cache, timesteps, config, device, dtype, generator)
        if validation_data is not None:
            job.validation = UnitReconstruction(model, unit, capture_unit_cache(model, unit, validation_data, capture_bs,
                                                device, dtype), validation_data.timesteps, config, device, dtype, generator)
        job.init_activation_ranges()
        set_quant_state(unit.module, weights=True, acts=True)
        before = job.mean_loss(eval_idx)
        diagnostics = job.optimise(weighting) if config.reconstruction == "adaround" else {}
        after = job.mean_loss(eval_idx)
        report = UnitReport(unit.name, type(unit.module).__name__, len(unit.layers), before, after,
                            round(time.time() - start, 2), diagnostics)
        reports.append(report)
        logger.info(f"{unit.name}: error {before:.4g} -> {after:.4g} ({report.seconds:.1f}s)")
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
