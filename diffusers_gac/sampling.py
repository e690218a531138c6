"""The one sampling layer under calibration and evaluation: seeded denoising loops over any diffusers scheduler.

* :func:`denoise` runs one batch of trajectories: any denoiser (``UNet2DModel``, ``UNet2DConditionModel``, DiT and
  other transformers), per-trajectory conditioning (class labels, prompt embeddings), classifier-free guidance, and
  an ``on_step`` hook that sees (and may replace) every noise prediction: for perturbation studies, for running a
  second model along the same trajectory, for measuring errors step by step.
* :func:`sample_images` draws seeded samples whose values depend only on the seed, the labels and the sampler
  settings: not on the device, nor on the batch size (up to the summation order of batched kernels). Initial noise
  is drawn on CPU from one generator for the whole run; a scheduler that adds noise during its steps (DDIM with
  ``eta > 0``, DDPM, ancestral samplers) gets one CPU generator per sample, seeded from the run generator.
* Calibration samplers: callables ``run(num_trajectories, seed)`` that push a denoiser through whole trajectories
  in place, so that a recorder can keep its inputs. Built from a scheduler (:func:`scheduler_sampler`), from prompt
  embeddings (:func:`prompt_embeds_sampler`) or from a loaded pipeline (:func:`pipeline_sampler`). Each runs exactly
  ``num_inference_steps`` denoiser calls per batch of trajectories, which is how the recorder tells the step of a call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import logging as dlogging
from torch import nn
from tqdm.auto import tqdm

from .denoisers import check_prompt_embeds

Sampler = Callable[[int, int], Any]


@dataclass
class DenoiseStep:
    """What an ``on_step`` hook of :func:`denoise` sees: one step of a batch of trajectories."""

    index: int  # the sampler step, 0 first
    timestep: torch.Tensor
    model_input: torch.Tensor  # the scaled noisy input (one copy, before classifier-free guidance doubles it)
    prediction: torch.Tensor  # the (guided) noise prediction the sampler is about to use
    conditioning: dict[str, torch.Tensor] | None = None
    negative_conditioning: dict[str, torch.Tensor] | None = None
    guidance_scale: float = 1.0

    def predict(self, denoiser: nn.Module) -> torch.Tensor:
        """Another denoiser's prediction for the same input, conditioning and guidance."""
        return predict_noise(denoiser, self.model_input, self.timestep, self.conditioning,
                             self.negative_conditioning, self.guidance_scale)


# on_step(step) -> the noise prediction to use instead (or None: unchanged)
StepHook = Callable[[DenoiseStep], torch.Tensor | None]


def num_class_labels(denoiser: nn.Module) -> int | None:
    """Number of classes a class-conditional denoiser takes (``num_class_embeds`` of a UNet, ``num_embeds_ada_norm``
    of a DiT), or ``None`` for one that takes no class labels."""
    config = getattr(denoiser, "config", {})
    if not hasattr(config, "get"):
        return None
    if config.get("num_class_embeds"):
        return config["num_class_embeds"]
    if config.get("norm_type") == "ada_norm_zero" or type(denoiser).__name__ == "DiTTransformer2DModel":
        return config.get("num_embeds_ada_norm")
    return None


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels ``0, 1, ..., num_classes - 1, 0, 1, ...``: every class equally often (up to one)."""
    return torch.arange(num_samples, dtype=torch.long) % num_classes


def cycle(values: torch.Tensor | Sequence, n: int):
    """``n`` items taken cyclically from ``values``."""
    if torch.is_tensor(values):
        return values[torch.arange(n) % len(values)]
    return [values[i % len(values)] for i in range(n)]


def device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    if hasattr(module, "device") and hasattr(module, "dtype"):  # diffusers ModelMixin
        return module.device, module.dtype
    param = next(module.parameters())
    return param.device, param.dtype


def sample_shape(denoiser: nn.Module, num_samples: int) -> tuple[int, ...]:
    """``(num_samples, in_channels, height, width)`` of the denoiser's samples (latents for a latent model)."""
    config = denoiser.config
    size = config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return (num_samples, config.in_channels, *hw)


def input_name(denoiser: nn.Module) -> str:
    """The keyword of the noisy input: ``sample`` for UNets, ``hidden_states`` for transformers."""
    params = inspect.signature(denoiser.forward).parameters
    return "sample" if "sample" in params else "hidden_states"


def progress_bar(total: int, desc: str, show_progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not (show_progress and dlogging.is_progress_bar_enabled()))


def fresh_scheduler(scheduler):
    """A new scheduler of the same kind and config: the caller's own is never stepped."""
    return type(scheduler).from_config(scheduler.config)


@torch.no_grad()
def denoise(
    denoiser: nn.Module,
    scheduler,
    noise: torch.Tensor,
    *,
    num_inference_steps: int,
    conditioning: dict[str, torch.Tensor] | None = None,
    negative_conditioning: dict[str, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    step_kwargs: dict[str, Any] | None = None,
    on_step: StepHook | None = None,
    progress: tqdm | None = None,
) -> torch.Tensor:
    """Run one batch of trajectories from ``noise`` (unit variance, any device) and return the final samples.

    ``scheduler`` is stepped in place after ``set_timesteps`` (pass :func:`fresh_scheduler` of the caller's).
    ``conditioning`` holds per-trajectory denoiser keywords (``class_labels``, ``encoder_hidden_states``, ...); with
    ``guidance_scale > 1`` the ``negative_conditioning`` half runs in the same call, first, as diffusers' pipelines
    do, and the prediction is ``uncond + scale * (cond - uncond)``. Models that also predict a variance have it cut
    off. ``step_kwargs`` go to ``scheduler.step`` (``eta``, ``generator``).
    """
    device, dtype = device_and_dtype(denoiser)
    if guidance_scale > 1 and negative_conditioning is None:
        raise ValueError("guidance_scale > 1 needs negative_conditioning (the unconditional inputs)")
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = noise.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        out = predict_noise(denoiser, model_input, t, conditioning, negative_conditioning, guidance_scale)
        if on_step is not None:
            replaced = on_step(DenoiseStep(k, t, model_input, out, conditioning, negative_conditioning, guidance_scale))
            out = out if replaced is None else replaced
        x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
        if progress is not None:
            progress.update(1)
    return x


def predict_noise(denoiser: nn.Module, model_input: torch.Tensor, t: torch.Tensor, conditioning=None,
                  negative_conditioning=None, guidance_scale: float = 1.0) -> torch.Tensor:
    """One denoiser call as :func:`denoise` makes it: the (guided) prediction for ``model_input`` at timestep ``t``,
    with a predicted variance cut off."""
    device, dtype = device_and_dtype(denoiser)
    guided = guidance_scale > 1
    kwargs = {k: v.to(device) for k, v in (conditioning or {}).items()}
    if guided:
        kwargs = {k: torch.cat([negative_conditioning[k].to(device), v]) for k, v in kwargs.items()}
        model_input = torch.cat([model_input, model_input])
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    timestep = t.expand(model_input.shape[0]) if torch.is_tensor(t) and t.dim() == 0 else t
    out = denoiser(**{input_name(denoiser): model_input}, timestep=timestep, **kwargs, return_dict=False)[0]
    out = out[:, : denoiser.config.in_channels]  # models that also predict a variance
    if guided:
        uncond, cond = out.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    return out


def resolve_labels(denoiser: nn.Module, num_samples: int, class_labels) -> torch.Tensor | None:
    """Per-sample class labels: ``None`` for a denoiser without classes, balanced labels by default, one label for
    all samples, or one per sample (checked against the number of classes)."""
    num_classes = num_class_labels(denoiser)
    if num_classes is None:
        if class_labels is not None:
            raise ValueError(f"class_labels were given but {type(denoiser).__name__} takes no class labels")
        return None
    if class_labels is None:
        return balanced_labels(num_samples, num_classes)
    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten().cpu()
    if labels.numel() == 1:
        labels = labels.expand(num_samples).clone()
    if labels.numel() != num_samples:
        raise ValueError(f"class_labels has {labels.numel()} entries; expected 1 or num_samples={num_samples}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], got values in [{labels.min()}, {labels.max()}]")
    return labels


@torch.no_grad()
def sample_images(
    unet: nn.Module,
    scheduler,
    num_samples: int,
    *,
    class_labels: torch.Tensor | int | list[int] | None = None,
    num_inference_steps: int = 25,
    batch_size: int = 256,
    seed: int = 0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    on_step: StepHook | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample ``num_samples`` images and return ``(images, labels)``.

    Args:
        unet: a diffusers denoiser (``UNet2DModel``, a DiT, ...); its ``config`` gives ``sample_size``,
            ``in_channels`` and the number of classes. It runs where it lives.
        scheduler: any diffusers scheduler; a fresh copy is made from its config, the caller's is left untouched.
        class_labels: for a class-conditional denoiser, one label for all samples or one per sample; ``None``
            gives balanced labels ``i % num_classes``. Must be ``None`` for a denoiser without classes.
        generator: a CPU generator to draw from instead of ``torch.Generator().manual_seed(seed)``.
        eta: DDIM's noise factor (only for schedulers whose ``step`` takes ``eta``).
        on_step: see :func:`denoise`; called per batch with batch-local tensors.

    Returns:
        ``images`` in model space (not clamped) as CPU float32 of shape ``(num_samples, C, H, W)``, and the
        CPU int64 labels used (``None`` for a denoiser without classes).
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                        ("num_inference_steps", num_inference_steps)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    elif generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (samples must not depend on the device), got {generator.device}")
    labels = resolve_labels(unet, num_samples, class_labels)
    step_params = inspect.signature(scheduler.step).parameters
    if eta != 0.0 and "eta" not in step_params:
        raise ValueError(f"eta={eta} was given but {type(scheduler).__name__}.step takes no eta")
    step_kwargs: dict[str, Any] = {"eta": eta} if "eta" in step_params else {}

    noise = torch.randn(sample_shape(unet, num_samples), generator=generator, dtype=torch.float32)
    step_seeds = None
    if "generator" in step_params:
        step_seeds = torch.randint(0, 2**62, (num_samples,), generator=generator).tolist()
    fresh = fresh_scheduler(scheduler)
    fresh.set_timesteps(num_inference_steps)
    progress = progress_bar(math.ceil(num_samples / batch_size) * len(fresh.timesteps), "sampling", show_progress)
    outputs = []
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        if step_seeds is not None:
            step_kwargs["generator"] = [torch.Generator().manual_seed(s) for s in step_seeds[start:stop]]
        conditioning = {"class_labels": labels[start:stop]} if labels is not None else None
        x = denoise(unet, fresh, noise[start:stop], num_inference_steps=num_inference_steps, conditioning=conditioning,
                    step_kwargs=step_kwargs, on_step=on_step, progress=progress)
        outputs.append(x.float().cpu())
    progress.close()
    return torch.cat(outputs), labels


# -- calibration samplers ------------------------------------------------------------------------------------------


def scheduler_sampler(denoiser: nn.Module, scheduler, num_inference_steps: int, *,
                      class_labels: torch.Tensor | None = None, batch_size: int | None = None,
                      show_progress: bool = True) -> Sampler:
    """Seeded sampling with ``scheduler`` (:func:`sample_images`); class-conditional denoisers get ``class_labels``
    cycled over the trajectories, or balanced labels."""

    def run(num_trajectories: int, seed: int) -> None:
        labels = None if class_labels is None else cycle(torch.as_tensor(class_labels).flatten(), num_trajectories)
        sample_images(denoiser, scheduler, num_trajectories, class_labels=labels,
                      num_inference_steps=num_inference_steps, seed=seed,
                      batch_size=batch_size or num_trajectories, show_progress=show_progress)

    return run


def prompt_embeds_sampler(denoiser: nn.Module, scheduler, num_inference_steps: int, prompt_embeds: torch.Tensor, *,
                          negative_prompt_embeds: torch.Tensor | None = None, guidance_scale: float = 1.0,
                          batch_size: int | None = None, show_progress: bool = True) -> Sampler:
    """Sampling of a text-conditional denoiser (``UNet2DConditionModel``, ``Transformer2DModel`` ...) conditioned
    on ``prompt_embeds`` (cycled over the trajectories), with classifier-free guidance when ``guidance_scale > 1``.
    Latents have the denoiser's ``in_channels`` and ``sample_size``."""
    if guidance_scale > 1 and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")
    check_prompt_embeds(denoiser, prompt_embeds)

    def run(num_trajectories: int, seed: int) -> None:
        noise = torch.randn(sample_shape(denoiser, num_trajectories), generator=torch.Generator().manual_seed(seed))
        cond = cycle(prompt_embeds, num_trajectories)
        uncond = cycle(negative_prompt_embeds, num_trajectories) if guidance_scale > 1 else None
        fresh = fresh_scheduler(scheduler)
        bs = batch_size or num_trajectories
        progress = progress_bar(math.ceil(num_trajectories / bs) * num_inference_steps, "calibration trajectories",
                                show_progress)
        for start in range(0, num_trajectories, bs):
            stop = min(start + bs, num_trajectories)
            negative = None if uncond is None else {"encoder_hidden_states": uncond[start:stop]}
            denoise(denoiser, fresh, noise[start:stop], num_inference_steps=num_inference_steps,
                    conditioning={"encoder_hidden_states": cond[start:stop]}, negative_conditioning=negative,
                    guidance_scale=guidance_scale, progress=progress)
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
    labels = None
    if "class_labels" in params and not prompts:
        denoiser = getattr(pipeline, denoiser_name(pipeline))
        labels = _pipeline_labels(denoiser, class_labels, type(pipeline).__name__)

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
                elif labels is not None:
                    kwargs["class_labels"] = [int(c) for c in cycle(labels, start + n)[start:]]
                elif "batch_size" in params:
                    kwargs["batch_size"] = n
                else:
                    raise ValueError(f"cannot tell how to ask {type(pipeline).__name__} for a batch of samples; "
                                     "calibrate with quantize_model(..., calibration_data=...) instead")
                pipeline(**kwargs)
        finally:
            pipeline._progress_bar_config = previous

    return run


def _pipeline_labels(denoiser: nn.Module, class_labels, pipeline_name: str) -> list[int]:
    if class_labels is not None:
        return [int(c) for c in torch.as_tensor(class_labels).flatten().tolist()]
    config = denoiser.config
    num_classes = num_class_labels(denoiser) or config.get("num_embeds_ada_norm")
    if not num_classes:
        raise ValueError(f"pass class_labels: the number of classes of {pipeline_name} is unknown")
    return list(range(num_classes))
