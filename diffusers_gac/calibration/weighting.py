"""Sample-weighting strategies for the reconstruction loss ``sum_i w_i * l_i``.

The reconstruction loop asks its strategy for the weights of each mini-batch and never looks inside it, so
``uniform`` (every sample counts the same: the Q-Diffusion / BRECQ baseline) and learned weightings differ in
one place. A strategy sees the unit being reconstructed through ``UnitProblem``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import GACConfig


@dataclass
class UnitProblem:
    """What a weighting strategy may use about the unit being reconstructed.

    ``per_sample_loss(indices, params=None)`` runs the unit on the given calibration samples and returns their
    reconstruction errors, shape ``(len(indices),)``; ``params`` (names relative to ``module``) stand in for the
    unit's current quantization parameters, so a strategy can evaluate a virtual update differentiably.
    """

    name: str
    module: nn.Module
    rounding_params: dict[str, torch.Tensor]  # AdaRound variables, by name relative to ``module``
    step_params: dict[str, torch.Tensor]  # learned activation step sizes
    timesteps: torch.Tensor  # (num_samples,) timestep of every calibration sample
    per_sample_loss: Callable[..., torch.Tensor]
    # a separate validation set (same signature), e.g. inputs from the quantized model's own trajectories
    validation_loss: Callable[..., torch.Tensor] | None = None
    validation_timesteps: torch.Tensor | None = None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {**self.rounding_params, **self.step_params}

    @property
    def num_samples(self) -> int:
        return len(self.timesteps)


class SampleWeighting:
    """Base class: weights of a mini-batch, normalised to sum to one."""

    name = "base"

    def begin_model(self, model: nn.Module, data: Any, validation_data: Any = None) -> None:
        """Called once before the first unit, the converted model still running in full precision, with the
        calibration data (and the separate validation data, if any)."""

    def begin_unit(self, problem: UnitProblem) -> None:
        """Called before a unit's reconstruction starts (a learned strategy fits its weights here)."""

    def batch_weights(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def end_unit(self) -> dict[str, Any]:
        """Called after a unit; returns diagnostics for the report."""
        return {}


class UniformWeighting(SampleWeighting):
    """Every sample of a mini-batch weighs ``1 / batch_size``."""

    name = "uniform"

    def __init__(self, config: GACConfig | None = None):
        self.config = config

    def batch_weights(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        return torch.full((len(indices),), 1.0 / len(indices))


def make_weighting(config: GACConfig, scheduler: Any = None) -> SampleWeighting:
    """The strategy ``config.weighting`` names (``scheduler``: for strategies that sample, see ``gac.py``)."""
    from .gac import GradientAlignedWeighting

    if config.weighting == "gradient_aligned":
        return GradientAlignedWeighting(config, scheduler=scheduler)
    strategies: dict[str, type[SampleWeighting]] = {"uniform": UniformWeighting}
    return strategies[config.weighting](config)
