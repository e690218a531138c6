"""Calibration samplers: callables ``run(num_trajectories, seed)`` that push a denoiser through whole sampling
trajectories, in place, so that ``CalibrationRecorder`` can record its inputs.

Calibration needs trajectories twice: from the full-precision model (the calibration data) and, for
``gac_validation="quantized_trajectories"``, from its round-to-nearest quantized self. A sampler is the one thing
the calibration flow needs to know about how a denoiser is driven; these build one from

* a scheduler, for unconditional and class-conditional denoisers (``scheduler_sampler``);
* prompt embeddings (with optional classifier-free guidance), for text-conditional denoisers
  (``prompt_embeds_sampler``);
* a loaded pipeline, which then drives its own denoiser with its own scheduler, text encoder, prompts or class
  labels (``pipeline_sampler``).

Every sampler runs exactly ``num_inference_steps`` denoiser calls per batch of trajectories, which is how the
recorder tells the sampler step of each call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.utils import logging as dlogging
from torch import nn
from tqdm.auto import tqdm

from .evaluation.sampling import _device_and_dtype, _sample_hw, sample_images

Sampler = Callable[[int, int], Any]


def _cycle(values: torch.Tensor | Sequence, n: int):
    """``n`` items taken cyclically from ``values``."""
    if torch.is_tensor(values):
        return values[torch.arange(n) % len(values)]
    return [values[i % len(values)] for i in range(n)]


def scheduler_sampler(denoiser: nn.Module, scheduler, num_inference_steps: int, *,
                      class_labels: torch.Tensor | None = None, batch_size: int | None = None,
                      show_progress: bool = True) -> Sampler:
    """Seeded sampling with ``scheduler`` (``evaluation.sample_images``); class-conditional denoisers get
    ``class_labels`` cycled over the trajectories, or balanced labels."""

    def run(num_trajectories: int, seed: int) -> None:
        labels = None if class_labels is None else _cycle(torch.as_tensor(class_labels).flatten(), num_trajectories)
        sample_images(denoiser, scheduler, num_trajectories, class_labels=labels,
                      num_inference_steps=num_inference_steps, seed=seed,
                      batch_size=batch_size or num_trajectories, show_progress=show_progress)

    return run


def _input_name(denoiser: nn.Module) -> str:
    params = inspect.signature(denoiser.forward).parameters
    return "sample" if "sample" in params else "hidden_states"


def prompt_embeds_sampler(denoiser: nn.Module, scheduler, num_inference_steps: int, prompt_embeds: torch.Tensor, *,
                          negative_prompt_embeds: torch.Tensor | None = None, guidance_scale: float = 1.0,
                          batch_size: int | None = None, show_progress: bool = True) -> Sampler:
    """Sampling of a text-conditional denoiser (``UNet2DConditionModel``, ``Transformer2DModel`` ...) conditioned
    on ``prompt_embeds`` (cycled over the trajectories), with classifier-free guidance when ``guidance_scale > 1``
    (unconditional and conditional halves in one call, as diffusers' pipelines do). Latents have the denoiser's
    ``in_channels`` and ``sample_size``."""
    if guidance_scale > 1 and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")
    input_name = _input_name(denoiser)

    @torch.no_grad()
    def run(num_trajectories: int, seed: int) -> None:
        device, dtype = _device_and_dtype(denoiser)
        generator = torch.Generator().manual_seed(seed)
        config = denoiser.config
        shape = (num_trajectories, config.in_channels, *_sample_hw(config.sample_size))
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        cond = _cycle(prompt_embeds, num_trajectories)
        uncond = None
        if guidance_scale > 1:
            uncond = _cycle(negative_prompt_embeds, num_trajectories)
        fresh = type(scheduler).from_config(scheduler.config)
        bs = batch_size or num_trajectories
        progress = tqdm(total=math.ceil(num_trajectories / bs) * num_inference_steps, desc="calibration trajectories",
                        disable=not (show_progress and dlogging.is_progress_bar_enabled()))
        for start in range(0, num_trajectories, bs):
            stop = min(start + bs, num_trajectories)
            fresh.set_timesteps(num_inference_steps, device=device)
            x = noise[start:stop].to(device=device, dtype=dtype) * fresh.init_noise_sigma
            emb = cond[start:stop].to(device=device, dtype=dtype)
            if uncond is not None:
                emb = torch.cat([uncond[start:stop].to(device=device, dtype=dtype), emb])
            for t in fresh.timesteps:
                model_input = fresh.scale_model_input(x, t)
                if uncond is not None:
                    model_input = torch.cat([model_input, model_input])
                timestep = t.expand(model_input.shape[0]) if torch.is_tensor(t) and t.dim() == 0 else t
                out = denoiser(**{input_name: model_input}, timestep=timestep, encoder_hidden_states=emb,
                               return_dict=False)[0]
                out = out[:, : x.shape[1]]  # models that also predict a variance
                if uncond is not None:
                    out_uncond, out_cond = out.chunk(2)
                    out = out_uncond + guidance_scale * (out_cond - out_uncond)
                x = fresh.step(out, t, x).prev_sample
                progress.update(1)
        progress.close()

    return run


def denoiser_name(pipeline) -> str:
    """The pipeline component that is the denoiser: ``unet`` or ``transformer``."""
    for name in ("unet", "transformer", "prior"):
        if isinstance(getattr(pipeline, name, None), nn.Module):
            return name
    raise ValueError(f"{type(pipeline).__name__} has no `unet` or `transformer` component to quantize")


def pipeline_sampler(pipeline, num_inference_steps: int, *, prompts: Sequence[str] | None = None,
                     class_labels: Sequence[int] | torch.Tensor | None = None, batch_size: int | None = None,
                     show_progress: bool = True, call_kwargs: dict[str, Any] | None = None) -> Sampler:
    """Drive ``pipeline`` itself: its scheduler, its text encoder (``prompts``, cycled over the trajectories) or
    class labels (``class_labels``; balanced over the denoiser's classes by default). ``call_kwargs`` go to every
    pipeline call (e.g. ``guidance_scale``, ``negative_prompt``). Latent pipelines stop before decoding."""
    params = inspect.signature(pipeline.__call__).parameters
    call_kwargs = dict(call_kwargs or {})
    if "prompt" in params and "batch_size" not in params:
        if not prompts:
            raise ValueError(
                f"{type(pipeline).__name__} is text-conditional: pass calibration prompts, e.g. "
                "quantize_pipeline(pipe, config, prompts=['a photo of a cat', ...])"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    elif prompts:
        raise ValueError(f"prompts were given but {type(pipeline).__name__} takes no prompt")
    if class_labels is not None and "class_labels" not in params:
        raise ValueError(f"class_labels were given but {type(pipeline).__name__} takes no class_labels")
    for fixed in ("num_inference_steps", "generator", "prompt", "class_labels", "batch_size", "num_images_per_prompt"):
        if fixed in call_kwargs:
            raise ValueError(f"{fixed!r} is set by the calibration and cannot be passed as a pipeline call argument")
    latent_output = "output_type" in params and any(
        isinstance(getattr(pipeline, n, None), nn.Module) for n in ("vae", "vqvae", "movq"))

    def run(num_trajectories: int, seed: int) -> None:
        bs = batch_size or num_trajectories
        previous = dict(getattr(pipeline, "_progress_bar_config", {}))
        pipeline.set_progress_bar_config(disable=not show_progress, desc="calibration trajectories")
        try:
            for chunk, start in enumerate(range(0, num_trajectories, bs)):
                n = min(bs, num_trajectories - start)
                kwargs: dict[str, Any] = dict(call_kwargs, num_inference_steps=num_inference_steps,
                                              generator=torch.Generator().manual_seed(seed + chunk))
                if latent_output:
                    kwargs.setdefault("output_type", "latent")
                if prompts:
                    kwargs["prompt"] = [prompts[(start + i) % len(prompts)] for i in range(n)]
                elif "class_labels" in params:
                    kwargs["class_labels"] = [int(c) for c in _cycle(_labels(pipeline, class_labels), start + n)[start:]]
                elif "batch_size" in params:
                    kwargs["batch_size"] = n
                else:
                    raise ValueError(f"cannot tell how to ask {type(pipeline).__name__} for a batch of samples; "
                                     "calibrate with quantize_model(..., calibration_data=...) instead")
                pipeline(**kwargs)
        finally:
            pipeline._progress_bar_config = previous

    return run


def _labels(pipeline, class_labels) -> list[int]:
    if class_labels is not None:
        return [int(c) for c in torch.as_tensor(class_labels).flatten().tolist()]
    config = getattr(pipeline, denoiser_name(pipeline)).config
    num_classes = config.get("num_class_embeds") or config.get("num_embeds_ada_norm")
    if not num_classes:
        raise ValueError(f"pass class_labels: the number of classes of {type(pipeline).__name__} is unknown")
    return list(range(num_classes))
