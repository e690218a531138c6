"""Calibration inside ``from_pretrained``: find a scheduler and calibration inputs for a freshly loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import DDIMScheduler
from diffusers.utils import logging
from torch import nn

from .config import GACConfig
from .denoisers import check_prompt_embeds
from .sampling import prompt_embeds_sampler, scheduler_sampler

logger = logging.get_logger(__name__)


def default_scheduler() -> DDIMScheduler:
    """DDIM over diffusers' default training schedule (linear betas 1e-4..0.02, 1000 steps)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def find_scheduler(checkpoint_dir: Path | None) -> DDIMScheduler:
    """The scheduler next to the model: ``<model>/scheduler`` or, for a model inside a pipeline folder,
    ``<pipeline>/scheduler``, as DDIM over its training schedule; otherwise ``default_scheduler()``."""
    for folder in ([checkpoint_dir / "scheduler", checkpoint_dir.parent / "scheduler"] if checkpoint_dir else []):
        if (folder / "scheduler_config.json").is_file():
            logger.info(f"calibrating with the schedule in {folder}")
            return DDIMScheduler.from_pretrained(folder)
    logger.warning("no scheduler found beside the model: calibrating with DDIM over the default linear schedule")
    return default_scheduler()


def is_text_conditional(model: nn.Module) -> bool:
    config = model.config
    return bool(config.get("cross_attention_dim") or config.get("addition_embed_type")
                or config.get("caption_channels") or config.get("joint_attention_dim"))


def check_calibration_inputs(model: nn.Module, config: GACConfig) -> None:
    """The inputs ``calibration_inputs`` would build fit ``model`` (run before its weights load)."""
    inputs = config.calibration_inputs
    if inputs is not None and inputs.sampler is not None:
        return
    if inputs is not None and inputs.prompt_embeds is not None:
        check_prompt_embeds(model, inputs.prompt_embeds, "calibration_inputs.prompt_embeds")
        return
    if is_text_conditional(model):
        raise ValueError(
            f"{type(model).__name__} is text-conditional: calibration needs inputs that from_pretrained cannot invent. "
            "Pass prompt embeddings with GACConfig(calibration_inputs=CalibrationInputs(prompt_embeds=..., "
            "negative_prompt_embeds=...), calib_guidance_scale=...), or a sampler with "
            "GACConfig(calibration_inputs=CalibrationInputs(sampler=fn)) where fn(denoiser, num_trajectories, seed) "
            "runs your sampling loop; or load the pipeline in full precision and call "
            "diffusers_gac.quantize_pipeline(pipe, config, prompts=[...])."
        )


def calibration_inputs(model: nn.Module, config: GACConfig, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """How a model fresh out of ``from_pretrained`` gets its calibration trajectories, as ``calibrate`` keywords:
    ``config.calibration_inputs.sampler``, else the scheduler over its ``prompt_embeds`` (text-conditional), else
    the scheduler alone."""
    check_calibration_inputs(model, config)
    inputs = config.calibration_inputs
    if inputs is not None and inputs.sampler is not None:
        fn = inputs.sampler
        return {"sampler": lambda num_trajectories, seed: fn(model, num_trajectories, seed)}
    if inputs is not None and inputs.prompt_embeds is not None:
        return {"sampler": prompt_embeds_sampler(
            model, find_scheduler(checkpoint_dir), config.calib_num_inference_steps, inputs.prompt_embeds,
            negative_prompt_embeds=inputs.negative_prompt_embeds, guidance_scale=config.calib_guidance_scale)}
    return {"sampler": scheduler_sampler(model, find_scheduler(checkpoint_dir), config.calib_num_inference_steps)}
