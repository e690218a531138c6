"""Sample-weighting strategies for the reconstruction loss ``sum_i w_i * l_i``.

The reconstruction loop asks its strategy for the weights of each mini-batch and never looks inside it, so
``uniform`` (every sample counts the same: the Q-Diffusion / BRECQ baseline) and learned weightings differ in
one place. A strategy sees the unit being reconstructed through ``UnitProblem``; ``reconstruction.make_weighting``
builds the one a config names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import GACConfig
from .problem import UnitProblem


class SampleWeighting:
    """Base class: weights of a mini-batch, normalised to sum to one."""

    name = "base"

    def begin_model(self, model: nn.Module, data: Any, validation_data: Any = None,
                    step_influence: dict[float, float] | None = None) -> None:
        """Called once before the first unit, the converted model still running in full precision, with the
        calibration data (and the separate validation data, if any; and each sampler step's influence on the
        samples, ``{timestep: influence}``, when the options asked for it; passed only then)."""

    def validation_mask(self, timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Samples (of one unit, by timestep) held out of training as the strategy's validation set: none."""
        return torch.zeros(len(timesteps), dtype=torch.bool)

    def begin_unit(self, problem: UnitProblem) -> None:
        """Called before a unit's reconstruction starts (a learned strategy fits its weights here)."""

    def before_step(self, step: int) -> None:
        """Called before every reconstruction step (a learned strategy may update its weights here)."""

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
