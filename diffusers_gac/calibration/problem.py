"""The vocabulary shared by the reconstruction loop, the sample-weighting strategies and the diagnostics: the
per-sample reconstruction error, timestep groups, and ``UnitProblem`` (what a strategy may see of a unit)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn


def per_sample_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels and averaged over positions, one value per sample.

    Channels are dim 1 for image-shaped ``(B, C, H, W)`` tensors and the last dim for token-shaped ``(B, L, C)``.
    """
    dtype = torch.promote_types(output.dtype, torch.float32)  # half-precision models: errors in float32
    sq = (output.to(dtype) - target.to(dtype)).pow(2)
    if sq.dim() == 4:
        return sq.sum(1).mean((1, 2))
    if sq.dim() == 3:
        return sq.sum(-1).mean(1)
    return sq.reshape(sq.shape[0], -1).sum(1)


def contiguous_groups(timesteps: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Group index of every sample: the distinct timesteps, sorted, cut into ``num_groups`` contiguous bands."""
    distinct = timesteps.unique(sorted=True)
    num_groups = max(1, min(num_groups, len(distinct)))
    band = torch.div(torch.arange(len(distinct)) * num_groups, len(distinct), rounding_mode="floor")
    return band[torch.searchsorted(distinct, timesteps)]


@dataclass
class UnitProblem:
    """What a weighting strategy may use about the unit being reconstructed.

    ``per_sample_loss(indices, params=None)`` runs the unit on the given calibration samples and returns their
    reconstruction errors, shape ``(len(indices),)``; ``params`` (names relative to ``module``, checked by
    ``check_names``) stand in for the unit's current quantization parameters, so a strategy can evaluate a virtual
    update differentiably. ``train_idx``/``val_idx`` split the samples into those the unit trains on and those the
    strategy held out; ``rounding(mode)`` is a context manager under which the weights are rounded ``"hard"`` (the
    final choice, straight-through gradients) or ``"soft"``. ``seed`` seeds the strategy's draws for this unit.
    """

    name: str
    module: nn.Module
    rounding_params: dict[str, torch.Tensor]  # AdaRound variables, by name relative to ``module``
    step_params: dict[str, torch.Tensor]  # learned activation step sizes
    timesteps: torch.Tensor  # (num_samples,) timestep of every calibration sample
    per_sample_loss: Callable[..., torch.Tensor]
    train_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    val_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    seed: int = 0
    check_names: Callable[[dict[str, torch.Tensor]], None] = lambda params: None
    rounding: Callable[[str], AbstractContextManager] = lambda mode: nullcontext()
    # a separate validation set (same signature), e.g. inputs from the quantized model's own trajectories
    validation_loss: Callable[..., torch.Tensor] | None = None
    validation_timesteps: torch.Tensor | None = None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {**self.rounding_params, **self.step_params}

    @property
    def num_samples(self) -> int:
        return len(self.timesteps)
