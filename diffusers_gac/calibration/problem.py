"""The vocabulary shared by the reconstruction loop, the sample-weighting strategies and the diagnostics: the
per-sample reconstruction error, timestep groups, and ``UnitProblem`` (what a strategy may see of a unit)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import Shard


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
class UnitReport:
    """What the reconstruction of one unit did: its errors before and after (training samples; held-out ones apart),
    time, the weighting strategy's diagnostics and what the lever search chose per layer (``quant/levers.py``)."""

    name: str
    kind: str
    layers: int
    loss_before: float  # mean error on (a subset of) the training samples
    loss_after: float
    seconds: float
    weighting: dict[str, Any] = field(default_factory=dict)
    val_loss_before: float | None = None  # on the strategy's held-out validation samples, if any
    val_loss_after: float | None = None
    levers: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnitProblem:
    """What a weighting strategy may use about the unit being reconstructed.

    Samples are numbered globally over all processes of a data-parallel calibration (see ``distributed.py``);
    ``timesteps``, ``train_idx`` and ``val_idx`` are global, and every process holds the same. ``shard`` says which
    samples this process holds: ``per_sample_loss(local_indices, params=None)`` runs the unit on some of them and
    returns their reconstruction errors, shape ``(len(local_indices),)``; ``params`` (names relative to ``module``,
    checked by ``check_names``) stand in for the unit's current quantization parameters, so a strategy can evaluate a
    virtual update differentiably. ``train_idx``/``val_idx`` split the samples into those the unit trains on and
    those the strategy held out; ``rounding(mode)`` is a context manager under which the weights are rounded
    ``"hard"`` (the final choice, straight-through gradients) or ``"soft"``. ``seed`` seeds the strategy's draws for
    this unit (alike on every process).
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
    shard: Shard | None = None  # None: one process holding every sample
    # a separate validation set (same signature, global timesteps, its own shard), e.g. inputs from the quantized
    # model's own trajectories
    validation_loss: Callable[..., torch.Tensor] | None = None
    validation_timesteps: torch.Tensor | None = None
    validation_shard: Shard | None = None

    def __post_init__(self) -> None:
        if self.shard is None:
            self.shard = Shard.single(len(self.timesteps))
        if self.validation_timesteps is not None and self.validation_shard is None:
            self.validation_shard = Shard.single(len(self.validation_timesteps))

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {**self.rounding_params, **self.step_params}

    @property
    def num_samples(self) -> int:
        return len(self.timesteps)

    def loss_sum(self, indices: torch.Tensor, weights: torch.Tensor | None = None, params=None, *,
                 validation: bool = False) -> torch.Tensor | None:
        """``sum_i w_i * l_i`` over the samples of the global ``indices`` this process holds (``weights``: one per
        index; None: 1), or None where it holds none of them. Summed over processes, it is the whole sum."""
        shard = self.validation_shard if validation else self.shard
        loss_fn = self.validation_loss if validation else self.per_sample_loss
        mask, local = shard.local(indices)
        if not mask.any():
            return None
        losses = loss_fn(local, params=params)
        if weights is not None:
            losses = weights[mask].to(losses) * losses
        return losses.sum()
