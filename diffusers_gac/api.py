"""The one calibration flow, as functions the quantizer hooks, the CLI and the examples all call:

    config -> record calibration data -> convert layers -> for each unit: (weights) -> reconstruct -> freeze
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn

from .calibration.data import CalibrationData, CalibrationRecorder, select_steps
from .calibration.reconstruction import UnitReport, reconstruct_model, reports_as_dicts
from .calibration.weighting import SampleWeighting
from .config import GACConfig
from .evaluation.sampling import sample_images
from .quant.convert import ConversionReport, convert_model, freeze_model
from .serialization import mark_quantized

logger = logging.get_logger(__name__)


def record_calibration_data(
    denoiser: nn.Module,
    scheduler,
    config: GACConfig,
    *,
    class_labels: torch.Tensor | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> CalibrationData:
    """Run the full-precision sampler and keep the denoiser inputs that ``config`` selects.

    Unconditional and class-conditional denoisers only (class labels default to a balanced set). For text- or
    otherwise conditioned denoisers, record with ``CalibrationRecorder`` around your own pipeline call.
    """
    keep = select_steps(config.calib_num_inference_steps, config.calib_timestep_selection, config.calib_num_timesteps,
                        config.calib_samples_per_timestep, seed=config.seed)
    trajectories = max(keep.values())
    with CalibrationRecorder(denoiser, keep, config.calib_num_inference_steps) as recorder:
        sample_images(denoiser, scheduler, trajectories, class_labels=class_labels,
                      num_inference_steps=config.calib_num_inference_steps, seed=config.seed,
                      batch_size=batch_size or trajectories, show_progress=show_progress)
    return recorder.data


@dataclass
class CalibrationReport:
    config: dict[str, Any]
    converted_layers: dict[str, dict]
    skipped_layers: list[str]
    num_calibration_samples: int
    units: list[UnitReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["units"] = reports_as_dicts(self.units)
        return d


def quantize_model(
    denoiser: nn.Module,
    config: GACConfig,
    *,
    scheduler=None,
    calibration_data: CalibrationData | None = None,
    class_labels: torch.Tensor | None = None,
    weighting: SampleWeighting | None = None,
    show_progress: bool = True,
) -> CalibrationReport:
    """Quantize ``denoiser`` in place and calibrate it; returns what was done and how long it took.

    Calibration data is recorded from ``scheduler`` unless ``calibration_data`` is given. ``weighting``
    overrides the strategy named by ``config.weighting``.
    """
    if calibration_data is None and scheduler is None:
        raise ValueError("quantize_model needs a scheduler to record calibration data, or calibration_data")
    seconds: dict[str, float] = {}
    start = time.time()
    if calibration_data is None:
        calibration_data = record_calibration_data(denoiser, scheduler, config, class_labels=class_labels,
                                                   show_progress=show_progress)
    seconds["record"] = round(time.time() - start, 2)
    conversion: ConversionReport = convert_model(denoiser, config)
    logger.info(f"converted {len(conversion)} layers; kept in full precision: {conversion.skipped}")
    start = time.time()
    units = reconstruct_model(denoiser, calibration_data, config, weighting=weighting, show_progress=show_progress)
    seconds["reconstruct"] = round(time.time() - start, 2)
    freeze_model(denoiser)
    calibrated = GACConfig.from_dict({**config.to_dict(), "converted_layers": conversion.layers,
                                      "quantized_attention": conversion.attention})
    mark_quantized(denoiser, calibrated)
    return CalibrationReport(
        config=config.to_dict(),
        converted_layers=conversion.layers,
        skipped_layers=conversion.skipped,
        num_calibration_samples=len(calibration_data),
        units=units,
        seconds=seconds,
    )

