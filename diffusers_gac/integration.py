"""Calibration inside ``from_pretrained``: find a scheduler and calibration inputs for a freshly loaded model."""

from __future__ import annotations

from pathlib import Path

from diffusers import DDIMScheduler
from diffusers.utils import logging
from torch import nn

from .config import GACConfig

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


def calibrate_loaded_model(model: nn.Module, config: GACConfig, checkpoint_dir: Path | None = None) -> None:
    """Quantize and calibrate a model that ``from_pretrained`` just loaded in full precision."""
    from .api import quantize_model

    if getattr(model.config, "cross_attention_dim", None) or getattr(model.config, "addition_embed_type", None):
        raise ValueError(
            f"{type(model).__name__} is text-conditional: calibration needs prompt embeddings, which from_pretrained "
            "cannot invent. Load the model in full precision and call diffusers_gac.quantize_model(model, config, "
            "calibration_data=...) with data recorded by diffusers_gac.CalibrationRecorder around your pipeline call."
        )
    quantize_model(model, config, scheduler=find_scheduler(checkpoint_dir))
