"""The one calibration flow, as functions the quantizer hooks, the CLI and the examples all call:

    config -> record calibration data -> convert layers -> for each unit: (weights) -> reconstruct -> freeze
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn

from .calibration.data import CalibrationData, CalibrationRecorder, select_steps
from .calibration.reconstruction import UnitReport, reconstruct_model, reports_as_dicts
from .calibration.weighting import SampleWeighting
from .config import GACConfig
from .evaluation.sampling import sample_images
from .quant.convert import ConversionReport, act_quantizers, convert_model, freeze_model, set_quant_state
from .samplers import Sampler, scheduler_sampler
from .serialization import mark_quantized, replace_folder_atomically

logger = logging.get_logger(__name__)


def record_calibration_data(
    denoiser: nn.Module,
    scheduler,
    config: GACConfig,
    *,
    class_labels: torch.Tensor | None = None,
    batch_size: int | None = None,
    sampler: Sampler | None = None,
    seed: int | None = None,
    num_trajectories: int | None = None,
    show_progress: bool = True,
) -> CalibrationData:
    """Run the sampler and keep the denoiser inputs that ``config`` selects.

    The sampler is ``sampler`` (any ``run(num_trajectories, seed)``, see ``diffusers_gac.samplers``) or, without
    one, ``scheduler`` driving an unconditional or class-conditional denoiser (class labels default to a balanced
    set). ``num_trajectories`` (default: as many as the selection needs) caps the samples kept per step.
    """
    keep = select_steps(config.calib_num_inference_steps, config.calib_timestep_selection, config.calib_num_timesteps,
                        config.calib_samples_per_timestep, seed=config.seed)
    if num_trajectories is not None:
        keep = {k: min(v, num_trajectories) for k, v in keep.items()}
    trajectories = max(keep.values())
    if sampler is None:
        if scheduler is None:
            raise ValueError("record_calibration_data needs a scheduler or a sampler")
        sampler = scheduler_sampler(denoiser, scheduler, config.calib_num_inference_steps, class_labels=class_labels,
                                    batch_size=batch_size, show_progress=show_progress)
    steps = config.calib_num_inference_steps
    with CalibrationRecorder(denoiser, keep, steps) as recorder:
        sampler(trajectories, config.seed if seed is None else seed)
    if recorder.calls == 0 or recorder.calls % steps:
        raise ValueError(
            f"the sampler called the denoiser {recorder.calls} times, which is not a whole number of trajectories "
            f"of calib_num_inference_steps={steps} calls; set calib_num_inference_steps to the number of denoiser "
            "calls per trajectory"
        )
    return recorder.data


@torch.no_grad()
def record_quantized_trajectories(denoiser: nn.Module, sampler: Sampler, config: GACConfig,
                                  calibration_data: CalibrationData, *, show_progress: bool = True) -> CalibrationData:
    """Inputs the denoiser sees along the trajectories of its round-to-nearest quantized self (a converted model,
    activation ranges observed on ``calibration_data``), with noise seeds disjoint from the calibration ones."""
    observe_activation_ranges(denoiser, calibration_data, config.batch_size)
    data = record_calibration_data(denoiser, None, config, sampler=sampler, seed=config.seed + 104729,
                                   num_trajectories=config.gac_validation_trajectories, show_progress=show_progress)
    set_quant_state(denoiser, weights=False, acts=False)
    return data


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
    sampler: Sampler | None = None,
    weighting: SampleWeighting | None = None,
    show_progress: bool = True,
) -> CalibrationReport:
    """Quantize ``denoiser`` in place and calibrate it; returns what was done and how long it took.

    Calibration data is ``calibration_data`` or is recorded by running ``sampler`` (``run(num_trajectories,
    seed)``, see ``diffusers_gac.samplers``), or ``scheduler`` for an unconditional or class-conditional denoiser
    (given both, the sampler records and the scheduler serves ``gac_timestep_importance``). ``weighting`` overrides
    the strategy named by ``config.weighting``.
    """
    if sampler is None and scheduler is not None:
        sampler = scheduler_sampler(denoiser, scheduler, config.calib_num_inference_steps, class_labels=class_labels,
                                    show_progress=show_progress)
    if calibration_data is None and sampler is None:
        raise ValueError("quantize_model needs a scheduler or a sampler to record calibration data, or calibration_data")
    seconds: dict[str, float] = {}
    start = time.time()
    if calibration_data is None:
        calibration_data = record_calibration_data(denoiser, None, config, sampler=sampler,
                                                   show_progress=show_progress)
    seconds["record"] = round(time.time() - start, 2)
    conversion: ConversionReport = convert_model(denoiser, config)
    logger.info(f"converted {len(conversion)} layers; kept in full precision: {conversion.skipped}")
    validation_data = None
    if config.weighting == "gradient_aligned" and config.gac_validation == "quantized_trajectories":
        if sampler is None:
            raise ValueError("gac_validation='quantized_trajectories' needs a scheduler or a sampler to sample the "
                             "quantized model")
        start = time.time()
        validation_data = record_quantized_trajectories(denoiser, sampler, config, calibration_data,
                                                        show_progress=show_progress)
        seconds["record_validation"] = round(time.time() - start, 2)
    start = time.time()
    units = reconstruct_model(denoiser, calibration_data, config, weighting=weighting,
                              validation_data=validation_data, scheduler=scheduler, show_progress=show_progress)
    seconds["reconstruct"] = round(time.time() - start, 2)
    freeze_model(denoiser)
    calibrated = GACConfig.from_dict({**config.to_dict(), "converted_layers": conversion.layers,
                                      "quantized_attention": conversion.attention})
    mark_quantized(denoiser, calibrated)
    report = CalibrationReport(
        config=config.to_dict(),
        converted_layers=conversion.layers,
        skipped_layers=conversion.skipped,
        num_calibration_samples=len(calibration_data),
        units=units,
        seconds=seconds,
    )
    denoiser._gac_calibration_report = report.to_dict()  # what push_to_hub's model card shows
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
    **call_kwargs,
) -> CalibrationReport:
    """Quantize the denoiser of an already loaded pipeline in place, calibrating it with the pipeline itself.

    The pipeline's own call produces the calibration trajectories: its scheduler, its text encoder with ``prompts``
    (required by text-to-image pipelines; cycled over the ``config.calib_samples_per_timestep`` trajectories) or
    ``class_labels`` (class-conditional pipelines; balanced by default). ``call_kwargs`` go to every pipeline call
    (``guidance_scale=7.5``, ``negative_prompt=...``); ``batch_size`` trajectories run per call (default: all).
    ``component`` names the denoiser (default ``unet``, else ``transformer``). Afterwards ``pipeline.save_pretrained``
    writes the quantized denoiser as a pre-calibrated checkpoint.

        pipe = StableDiffusionPipeline.from_pretrained(path)
        quantize_pipeline(pipe, GACConfig(w_bits=4, a_bits=8), prompts=["a cat", "a city at night"], guidance_scale=7.5)
    """
    from .samplers import denoiser_name, pipeline_sampler

    component = component or denoiser_name(pipeline)
    denoiser = getattr(pipeline, component, None)
    if not isinstance(denoiser, nn.Module):
        raise ValueError(f"{type(pipeline).__name__} has no component {component!r} to quantize")
    if getattr(denoiser, "is_quantized", False):
        raise ValueError(f"pipeline.{component} is already quantized")
    sampler = pipeline_sampler(pipeline, config.calib_num_inference_steps, prompts=prompts, class_labels=class_labels,
                               batch_size=batch_size, show_progress=show_progress, call_kwargs=call_kwargs)
    return quantize_model(denoiser, config, sampler=sampler, show_progress=show_progress)


def calibrate_and_save(
    fp_denoiser: nn.Module,
    scheduler,
    config: GACConfig,
    output: str | Path,
    *,
    eval_samples: int = 500,
    num_inference_steps: int = 25,
    batch_size: int = 256,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The main job: quantize a copy of ``fp_denoiser``, evaluate it against the original and write
    ``output/{unet,scheduler}`` (a folder ``diffusers_gac.zoo.load_model`` and ``from_pretrained`` read),
    ``samples.png``, ``report.json`` and ``diagnostics.png`` (gradient conflict and learned weights per unit). The folder appears complete or not at all."""
    from .calibration.plots import plot_calibration
    from .evaluation import evaluate_denoiser, image_grid, summarize

    output = Path(output)
    denoiser = copy.deepcopy(fp_denoiser)
    report = quantize_model(denoiser, config, scheduler=scheduler, show_progress=show_progress)
    result: dict[str, Any] = {"calibration": report.to_dict()}
    common = dict(num_samples=eval_samples, num_inference_steps=num_inference_steps, seed=config.seed,
                  batch_size=batch_size, show_progress=show_progress)
    if eval_samples > 0:
        reference, _ = sample_images(fp_denoiser, scheduler, eval_samples, num_inference_steps=num_inference_steps,
                                     seed=config.seed, batch_size=batch_size, show_progress=show_progress)
        fp_eval = evaluate_denoiser(fp_denoiser, scheduler, reference_unet=fp_denoiser, **common)
        q_eval = evaluate_denoiser(denoiser, scheduler, reference_images=reference, **common)
        result["evaluation"] = {"full_precision": summarize([fp_eval]), "quantized": summarize([q_eval])}
        denoiser._gac_calibration_report = {**result["calibration"], "evaluation": result["evaluation"]}
    grid_images, _ = sample_images(denoiser, scheduler, 100, num_inference_steps=num_inference_steps, seed=config.seed,
                                   show_progress=False)

    def write(folder: Path) -> None:
        denoiser.save_pretrained(folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")
        image_grid(grid_images, nrow=10).save(folder / "samples.png")
        if config.reconstruction != "none":
            plot_calibration(result["calibration"]["units"], folder / "diagnostics.png")
        (folder / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    write_folder_atomically(output, write)
    return result


def write_folder_atomically(output: Path, write) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``output``: an interrupted or failed
    write leaves no ``output`` behind (an existing empty ``output`` folder is replaced)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not empty")
    replace_folder_atomically(output, write)
