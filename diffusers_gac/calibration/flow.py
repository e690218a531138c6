"""The calibration flow, in one place:

    record calibration data -> convert layers -> for each unit: (learn sample weights) -> reconstruct -> freeze

:func:`calibrate` runs it on a plain ``nn.Module`` and returns a :class:`CalibrationReport`; it knows nothing of
diffusers' quantizer objects. The public verbs (``diffusers_gac.quantize_model``, ``quantize_pipeline``) and the
``from_pretrained`` backend are thin layers on top of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn

from ..config import GACConfig, QuantizedLayout
from ..denoisers import check_denoiser, check_full_precision
from ..quant.convert import (act_quantizers, convert_model, float_layers, freeze_model, quant_layers,
                             set_quant_state)
from ..sampling import Sampler
from .data import CalibrationData, CalibrationRecorder, select_steps
from .reconstruction import UnitReport, reconstruct_model, reports_as_dicts
from .weighting import SampleWeighting

logger = logging.get_logger(__name__)


def record_calibration_data(
    denoiser: nn.Module,
    sampler: Sampler,
    config: GACConfig,
    *,
    seed: int | None = None,
    num_trajectories: int | None = None,
) -> CalibrationData:
    """Run ``sampler`` (any ``run(num_trajectories, seed)``, see ``diffusers_gac.sampling``) and keep the denoiser
    inputs that ``config`` selects. ``num_trajectories`` (default: as many as the selection needs) caps the samples
    kept per step; ``seed`` defaults to ``config.seed``."""
    keep = select_steps(config.calib_num_inference_steps, config.calib_timestep_selection, config.calib_num_timesteps,
                        config.calib_samples_per_timestep, seed=config.seed)
    if num_trajectories is not None:
        keep = {k: min(v, num_trajectories) for k, v in keep.items()}
    steps = config.calib_num_inference_steps
    with CalibrationRecorder(denoiser, keep, steps) as recorder:
        sampler(max(keep.values()), config.seed if seed is None else seed)
    if recorder.calls == 0 or recorder.calls % steps:
        raise ValueError(
            f"the sampler called the denoiser {recorder.calls} times, which is not a whole number of trajectories "
            f"of calib_num_inference_steps={steps} calls; set calib_num_inference_steps to the number of denoiser "
            "calls per trajectory"
        )
    return recorder.data


@torch.no_grad()
def observe_activation_ranges(model: nn.Module, data: CalibrationData, batch_size: int) -> None:
    """Set every activation quantizer's range from the inputs it sees on ``data`` (weights quantized to nearest);
    afterwards the whole model runs quantized."""
    param = next(model.parameters())
    quantizers = act_quantizers(model)
    set_quant_state(model, weights=True, acts=True)
    for q in quantizers:
        q.start_observing()
    for i in range(0, len(data), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(data)))
        model(**data.batch(idx, device=param.device, dtype=param.dtype), return_dict=False)
    for q in quantizers:
        q.finish_observing()


@torch.no_grad()
def record_quantized_trajectories(denoiser: nn.Module, sampler: Sampler, config: GACConfig,
                                  calibration_data: CalibrationData) -> CalibrationData:
    """Inputs the denoiser sees along the trajectories of its round-to-nearest quantized self (a converted model,
    activation ranges observed on ``calibration_data``), with noise seeds disjoint from the calibration ones."""
    observe_activation_ranges(denoiser, calibration_data, config.batch_size)
    data = record_calibration_data(denoiser, sampler, config, seed=config.seed + 104729,
                                   num_trajectories=config.gac_validation_trajectories)
    set_quant_state(denoiser, weights=False, acts=False)
    return data


@dataclass
class CalibrationReport:
    """What a calibration did: its options, the layout it produced, per-unit errors and diagnostics, timings."""

    config: dict[str, Any]
    layout: QuantizedLayout
    skipped_layers: list[str]
    num_calibration_samples: int
    units: list[UnitReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["layout"] = self.layout.to_dict()
        d["units"] = reports_as_dicts(self.units)
        return d


def calibrate(
    denoiser: nn.Module,
    config: GACConfig,
    *,
    calibration_data: CalibrationData | None = None,
    sampler: Sampler | None = None,
    weighting: SampleWeighting | None = None,
    show_progress: bool = True,
) -> CalibrationReport:
    """Quantize ``denoiser`` in place and calibrate it: the whole flow, on a plain module.

    Calibration data is ``calibration_data`` or is recorded by running ``sampler``; ``weighting`` overrides the
    strategy ``config.weighting`` names. The
    returned report carries the layout to save with the model; the model holds frozen quantized layers.
    """
    if calibration_data is None and sampler is None:
        raise ValueError("calibration needs a sampler to record calibration data, or calibration_data")
    check_denoiser(denoiser)
    if quant_layers(denoiser):
        raise ValueError(f"{type(denoiser).__name__} already holds diffusers-gac quantized layers; calibrate a "
                         "full-precision model")
    check_full_precision(denoiser)
    seconds: dict[str, float] = {}
    start = time.time()
    if calibration_data is None:
        calibration_data = record_calibration_data(denoiser, sampler, config)
    seconds["record"] = round(time.time() - start, 2)
    layout = convert_model(denoiser, config)
    skipped = float_layers(denoiser)
    logger.info(f"converted {len(layout.layers)} layers; kept in full precision: {skipped}")
    validation_data = None
    if config.weighting == "gradient_aligned" and config.gac_validation == "quantized_trajectories":
        if sampler is None:
            raise ValueError("gac_validation='quantized_trajectories' needs a scheduler or a sampler to sample the "
                             "quantized model")
        start = time.time()
        validation_data = record_quantized_trajectories(denoiser, sampler, config, calibration_data)
        seconds["record_validation"] = round(time.time() - start, 2)
    start = time.time()
    units = reconstruct_model(denoiser, calibration_data, config, weighting=weighting,
                              validation_data=validation_data, show_progress=show_progress)
    seconds["reconstruct"] = round(time.time() - start, 2)
    freeze_model(denoiser)
    return CalibrationReport(config=config.options(), layout=layout, skipped_layers=skipped,
                             num_calibration_samples=len(calibration_data), units=units, seconds=seconds)
