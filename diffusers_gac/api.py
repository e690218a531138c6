"""The public verbs: quantize a denoiser you hold, or the denoiser of a loaded pipeline.

Both are thin: they build a sampler for the calibration trajectories, run the calibration flow
(``calibration.flow.calibrate``) and give the model what the "gac" backend gives a model loaded with
``from_pretrained`` (``hf_quantizer``, the config with its layout), so ``save_pretrained``/``from_pretrained`` round
trip.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from .calibration import flow
from .calibration.data import CalibrationData
from .calibration.flow import CalibrationReport, calibrate
from .calibration.reconstruction import make_weighting
from .calibration.weighting import SampleWeighting
from .config import GACConfig
from .denoisers import check_not_quantized
from .quantizer import mark_calibrated
from .sampling import Sampler, denoiser_name, pipeline_sampler, scheduler_sampler


def record_calibration_data(
    denoiser: nn.Module,
    config: GACConfig,
    *,
    scheduler=None,
    sampler: Sampler | None = None,
    class_labels: torch.Tensor | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> CalibrationData:
    """Record the calibration data ``config`` selects from the full-precision ``denoiser``'s trajectories.

    The trajectories come from ``sampler`` (any ``run(num_trajectories, seed)``, see ``diffusers_gac.sampling``) or,
    without one, from ``scheduler`` driving an unconditional or class-conditional denoiser (class labels default to
    a balanced set; ``batch_size`` trajectories at a time). Pass the result to ``quantize_model(...,
    calibration_data=...)`` to calibrate several configurations on the same data.
    """
    if sampler is None:
        if scheduler is None:
            raise ValueError("record_calibration_data needs a scheduler or a sampler")
        sampler = scheduler_sampler(denoiser, scheduler, config.calib_num_inference_steps, class_labels=class_labels,
                                    batch_size=batch_size, show_progress=show_progress)
    return flow.record_calibration_data(denoiser, sampler, config)


def quantize_model(
    denoiser: nn.Module,
    config: GACConfig,
    *,
    scheduler=None,
    calibration_data: CalibrationData | None = None,
    class_labels: torch.Tensor | None = None,
    sampler: Sampler | None = None,
    weighting: SampleWeighting | None = None,
    show_progress: bool = True,
    accelerator=None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> CalibrationReport:
    """Quantize ``denoiser`` in place and calibrate it; returns what was done and how long it took.

    Calibration data is ``calibration_data`` or is recorded by running ``sampler`` (``run(num_trajectories,
    seed)``, see ``diffusers_gac.sampling``), or ``scheduler`` for an unconditional or class-conditional denoiser.
    ``weighting`` overrides the strategy named by ``config.weighting``. Afterwards the model saves and loads like one calibrated by
    ``from_pretrained``.
    """
    check_not_quantized(denoiser)  # (from_pretrained marks the model quantized before it calibrates it)
    show_progress = show_progress and (accelerator is None or accelerator.is_main_process)  # one set of bars
    if sampler is None and scheduler is not None:
        sampler = scheduler_sampler(denoiser, scheduler, config.calib_num_inference_steps, class_labels=class_labels,
                                    show_progress=show_progress)
    if calibration_data is None and sampler is None:
        raise ValueError("quantize_model needs a scheduler or a sampler to record calibration data, or calibration_data")
    report = calibrate(denoiser, config, calibration_data=calibration_data, sampler=sampler,
                       weighting=weighting or make_weighting(config), show_progress=show_progress,
                       state=accelerator, checkpoint_dir=checkpoint_dir)
    calibrated = dataclasses.replace(config, layout=report.layout, calibration_inputs=None)
    mark_calibrated(denoiser, calibrated, report.to_dict())
    return report


def quantize_pipeline(
    pipeline,
    config: GACConfig,
    *,
    component: str | None = None,
    prompts: list[str] | str | None = None,
    class_labels: list[int] | torch.Tensor | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
    accelerator=None,
    checkpoint_dir: str | os.PathLike | None = None,
    **call_kwargs,
) -> CalibrationReport:
    """Quantize the denoiser of an already loaded pipeline in place, calibrating it with the pipeline itself.

    The pipeline's own call produces the calibration trajectories: its scheduler, its text encoder with ``prompts``
    (required by text-to-image pipelines; cycled over the ``config.calib_samples_per_timestep`` trajectories) or
    ``class_labels`` (class-conditional pipelines; balanced by default). ``call_kwargs`` go to every pipeline call
    (``guidance_scale=7.5``, ``negative_prompt=...``); ``batch_size`` trajectories run per call (default: all).
    ``component`` names the denoiser (default ``unet``, else ``transformer``). ``accelerator`` and
    ``checkpoint_dir``: as for :func:`quantize_model`. Afterwards
    ``diffusers_gac.save_pretrained(pipeline, path)`` (or the pipeline's own ``save_pretrained``) writes the
    quantized denoiser as a pre-calibrated checkpoint.

        pipe = StableDiffusionPipeline.from_pretrained(path)
        quantize_pipeline(pipe, GACConfig(w_bits=4, a_bits=8), prompts=["a cat", "a city at night"], guidance_scale=7.5)
    """
    component = component or denoiser_name(pipeline)
    denoiser = getattr(pipeline, component, None)
    if not isinstance(denoiser, nn.Module):
        raise ValueError(f"{type(pipeline).__name__} has no component {component!r} to quantize")
    if getattr(denoiser, "is_quantized", False):
        raise ValueError(f"pipeline.{component} is already quantized")
    show_progress = show_progress and (accelerator is None or accelerator.is_main_process)
    sampler = pipeline_sampler(pipeline, config.calib_num_inference_steps, prompts=prompts, class_labels=class_labels,
                               batch_size=batch_size, show_progress=show_progress, call_kwargs=call_kwargs)
    return quantize_model(denoiser, config, sampler=sampler, show_progress=show_progress, accelerator=accelerator,
                          checkpoint_dir=checkpoint_dir)
