"""``CalibrationInputs``: the runtime inputs a calibration runs on when ``from_pretrained`` cannot find them itself
(prompt embeddings or a sampler for text-conditional denoisers); part of a ``GACConfig`` while calibrating, never
saved."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CalibrationInputs:
    """Inputs a calibration runs on when ``from_pretrained`` cannot find them by itself. Used while calibrating,
    never written to ``config.json``.

    Args:
        prompt_embeds: for a text-conditional denoiser, the prompt embeddings ``(num_prompts, seq_len, dim)`` its
            calibration trajectories are conditioned on (cycled over the trajectories).
        negative_prompt_embeds: the unconditional (empty-prompt) embeddings ``(1 or num_prompts, seq_len, dim)``,
            needed for classifier-free guidance (``GACConfig.calib_guidance_scale > 1``).
        sampler: a callable ``fn(denoiser, num_trajectories, seed)`` that runs ``num_trajectories`` whole sampling
            trajectories through the denoiser in place (its calls are recorded); the most general way to give a
            text- or otherwise-conditioned denoiser its inputs.
    """

    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    sampler: Callable[[Any, int, int], Any] | None = None

    def __post_init__(self) -> None:
        embeds, negative = self.prompt_embeds, self.negative_prompt_embeds
        for name, value in (("prompt_embeds", embeds), ("negative_prompt_embeds", negative)):
            if value is not None and (not torch.is_tensor(value) or value.dim() != 3):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"CalibrationInputs.{name} must be a tensor of shape (num_prompts, seq_len, dim), "
                                 f"got {shape}")
        if negative is not None:
            if embeds is None:
                raise ValueError("CalibrationInputs.negative_prompt_embeds was given without prompt_embeds")
            if negative.shape[1:] != embeds.shape[1:] or negative.shape[0] not in (1, embeds.shape[0]):
                raise ValueError(
                    f"CalibrationInputs.negative_prompt_embeds must have shape (1 or {embeds.shape[0]}, "
                    f"{embeds.shape[1]}, {embeds.shape[2]}) to match prompt_embeds, got {tuple(negative.shape)}"
                )
        if self.sampler is not None and not callable(self.sampler):
            raise ValueError("CalibrationInputs.sampler must be a callable fn(denoiser, num_trajectories, seed), got "
                             f"{type(self.sampler).__name__}")
