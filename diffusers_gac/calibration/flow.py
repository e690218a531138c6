"""The calibration flow, in one place:

    record calibration data -> convert layers -> for each unit: (learn sample weights) -> reconstruct -> freeze

:func:`calibrate` runs it on a plain ``nn.Module`` and returns a :class:`CalibrationReport`; it knows nothing of
diffusers' quantizer objects. The public verbs (``diffusers_gac.quantize_model``, ``quantize_pipeline``) and the
``from_pretrained`` backend are thin layers on top of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
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
from .distributed import Shard
from .influence import step_influence
from .resume import UnitCheckpoint, claim_folder, run_fingerprint
from .reconstruction import UnitReport, reconstruct_model, reports_as_dicts
from .weighting import SampleWeighting

logger = logging.get_logger(__name__)


def trajectory_share(total: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of the trajectories process ``rank`` of ``world`` records (the first ones get one more)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def record_calibration_data(
    denoiser: nn.Module,
    sampler: Sampler,
    config: GACConfig,
    *,
    seed: int | None = None,
    num_trajectories: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> CalibrationData:
    """Run ``sampler`` (any ``run(num_trajectories, seed)``, see ``diffusers_gac.sampling``) and keep the denoiser
    inputs that ``config`` selects. ``num_trajectories`` (default: as many as the selection needs) caps the samples
    kept per step; ``seed`` defaults to ``config.seed``. Process ``rank`` of ``world`` (data-parallel calibration)
    records its own share of the trajectories, with a seed of its own, and keeps its share of every step's samples."""
    keep = select_steps(config.calib_num_inference_steps, config.calib_timestep_selection, config.calib_num_timesteps,
                        config.calib_samples_per_timestep, seed=config.seed)
    if num_trajectories is not None:
        keep = {k: min(v, num_trajectories) for k, v in keep.items()}
    total = max(keep.values())
    if total < world:
        raise ValueError(f"{total} calibration trajectories cannot be shared by {world} processes; raise "
                         "calib_samples_per_timestep to at least the number of processes")
    start, stop = trajectory_share(total, rank, world)
    keep = {k: min(max(v - start, 0), stop - start) for k, v in keep.items()}
    seed = config.seed if seed is None else seed
    steps = config.calib_num_inference_steps
    with CalibrationRecorder(denoiser, {k: v for k, v in keep.items() if v}, steps) as recorder:
        sampler(stop - start, seed if world == 1 else seed + 1_000_003 * rank)
    if recorder.calls == 0 or recorder.calls % steps:
        raise ValueError(
            f"the sampler called the denoiser {recorder.calls} times, which is not a whole number of trajectories "
            f"of calib_num_inference_steps={steps} calls; set calib_num_inference_steps to the number of denoiser "
            "calls per trajectory"
        )
    return recorder.data


@torch.no_grad()
def observe_activation_ranges(model: nn.Module, data: CalibrationData, batch_size: int, merge=None) -> None:
    """Set every activation quantizer's range from the inputs it sees on ``data`` (weights quantized to nearest);
    afterwards the whole model runs quantized. ``merge``: see ``ActQuantizer.finish_observing``."""
    param = next(model.parameters())
    quantizers = act_quantizers(model)
    set_quant_state(model, weights=True, acts=True)
    for q in quantizers:
        q.start_observing()
    for i in range(0, len(data), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(data)))
        model(**data.batch(idx, device=param.device, dtype=param.dtype), return_dict=False)
    for q in quantizers:
        q.finish_observing(merge)


@torch.no_grad()
def record_quantized_trajectories(denoiser: nn.Module, sampler: Sampler, config: GACConfig,
                                  calibration_data: CalibrationData, shard: Shard) -> CalibrationData:
    """Inputs the denoiser sees along the trajectories of its round-to-nearest quantized self (a converted model,
    activation ranges observed on the calibration data of every process), with noise seeds disjoint from the
    calibration ones."""
    observe_activation_ranges(denoiser, calibration_data, config.batch_size, shard.rows if shard.distributed else None)
    data = record_calibration_data(denoiser, sampler, config, seed=config.seed + 104729, rank=shard.rank,
                                   world=shard.world, num_trajectories=config.gac_validation_trajectories)
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
    state=None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> CalibrationReport:
    """Quantize ``denoiser`` in place and calibrate it: the whole flow, on a plain module.

    Calibration data is ``calibration_data`` or is recorded by running ``sampler``; ``weighting`` overrides the
    strategy ``config.weighting`` names. The returned report carries the layout to save with the model; the model
    holds frozen quantized layers.

    ``state`` (an Accelerate ``Accelerator`` or ``PartialState`` of several processes) makes the calibration
    data-parallel: every process records its own share of the trajectories (or brings its own ``calibration_data``)
    and all end with the same quantized model. ``checkpoint_dir`` keeps the calibration data and every finished
    unit there; calling again with the same folder and options resumes where an interrupted call stopped and ends
    with the same model as an uninterrupted one.
    """
    if calibration_data is None and sampler is None:
        raise ValueError("calibration needs a sampler to record calibration data, or calibration_data")
    check_denoiser(denoiser)
    if quant_layers(denoiser):
        raise ValueError(f"{type(denoiser).__name__} already holds diffusers-gac quantized layers; calibrate a "
                         "full-precision model")
    check_full_precision(denoiser)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        claim_folder(folder, run_fingerprint(denoiser, config.options(), world, calibration_data), is_main=rank == 0)
        if state is not None:
            state.wait_for_everyone()  # the main process has written run.json before anyone writes data
    seconds: dict[str, float] = {}
    if calibration_data is None:
        calibration_data = _timed(seconds, "record", lambda: _cached(
            folder, f"data-{rank}-of-{world}",
            lambda: record_calibration_data(denoiser, sampler, config, rank=rank, world=world)))
    else:
        seconds["record"] = 0.0
    influence = None
    if _uses(config, "gac_validation_weighting", "sample_influence", sampler,
             "to measure each sampler step's influence on the samples"):
        influence = _timed(seconds, "step_influence", lambda: step_influence(
            denoiser, sampler, config.calib_num_inference_steps, trajectories=config.gac_validation_trajectories,
            seed=config.seed + 15_485_863))
        logger.info("step influence: " + ", ".join(f"t={t:g}: {v:.3g}" for t, v in influence.items()))
    shard = (Shard.across_processes(len(calibration_data), state) if state is not None
             else Shard.single(len(calibration_data)))
    layout = convert_model(denoiser, config)
    skipped = float_layers(denoiser)
    logger.info(f"converted {len(layout.layers)} layers; kept in full precision: {skipped}")
    validation_data = None
    if _uses(config, "gac_validation", "quantized_trajectories", sampler, "to sample the quantized model"):
        validation_data = _timed(seconds, "record_validation", lambda: _cached(
            folder, f"validation-{rank}-of-{world}",
            lambda: record_quantized_trajectories(denoiser, sampler, config, calibration_data, shard)))
    checkpoint = None
    if folder is not None:
        checkpoint = UnitCheckpoint(folder, {"options": config.options(), "processes": world}, is_main=rank == 0)
    units = _timed(seconds, "reconstruct", lambda: reconstruct_model(
        denoiser, calibration_data, config, weighting=weighting, validation_data=validation_data,
        show_progress=show_progress, state=state, checkpoint=checkpoint, step_influence=influence))
    freeze_model(denoiser, config.execution)
    return CalibrationReport(config=config.options(), layout=layout, skipped_layers=skipped,
                             num_calibration_samples=shard.total, units=units, seconds=seconds)


def _uses(config: GACConfig, option: str, value: str, sampler: Sampler | None, purpose: str) -> bool:
    """Whether learned weights run with ``option=value``, which needs a sampler (``purpose`` says what for)."""
    if config.weighting != "gradient_aligned" or getattr(config, option) != value:
        return False
    if sampler is None:
        raise ValueError(f"{option}={value!r} needs a scheduler or a sampler {purpose}")
    return True


def _timed(seconds: dict[str, float], name: str, work):
    """``work()``, its wall time kept in ``seconds[name]``."""
    start = time.time()
    out = work()
    seconds[name] = round(time.time() - start, 2)
    return out


def _cached(folder: Path | None, name: str, record) -> CalibrationData:
    """``record()``'s calibration data, kept in ``folder/name.safetensors`` and read from there when it is already
    written (a resumed calibration does not sample again)."""
    if folder is None:
        return record()
    path = folder / f"{name}.safetensors"
    if path.is_file():
        return CalibrationData.load(path)
    data = record()
    tmp = path.with_name(f".{path.name}.tmp")
    data.save(tmp)
    os.replace(tmp, path)  # one file (tensors, and the rest as JSON metadata), renamed into place
    return data
