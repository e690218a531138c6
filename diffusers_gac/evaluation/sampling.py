"""Seeded sampling from any diffusers denoiser with any diffusers scheduler, and an image grid to look at it.

Samples depend only on the seed, the labels and the sampler settings: not on the device, nor on the batch size
(up to the floating-point summation order of batched kernels).
The initial noise is drawn on CPU from one generator for the whole run; a scheduler that adds noise during its
steps (DDIM with ``eta > 0``, DDPM, ancestral samplers) gets one CPU generator per sample, seeded from the same
run generator, so each sample's noise is its own whatever batch it lands in.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from diffusers.utils import logging as dlogging
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..data import to_unit_range


def num_class_labels(unet: nn.Module) -> int | None:
    """Number of classes a class-conditional denoiser takes, or ``None`` for an unconditional one."""
    config = getattr(unet, "config", {})
    return config.get("num_class_embeds") if hasattr(config, "get") else None


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels ``0, 1, ..., num_classes - 1, 0, 1, ...``: every class equally often (up to one)."""
    return torch.arange(num_samples, dtype=torch.long) % num_classes


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    if hasattr(module, "device") and hasattr(module, "dtype"):  # diffusers ModelMixin
        return module.device, module.dtype
    param = next(module.parameters())
    return param.device, param.dtype


def _resolve_labels(unet: nn.Module, num_samples: int, class_labels) -> torch.Tensor | None:
    num_classes = num_class_labels(unet)
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("class_labels were given but the denoiser is unconditional (config.num_class_embeds is None)")
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
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample ``num_samples`` images and return ``(images, labels)``.

    Args:
        unet: a diffusers denoiser called as ``unet(x, t, class_labels=...)`` (``UNet2DModel`` or alike); its
            ``config`` gives ``sample_size``, ``in_channels`` and ``num_class_embeds``.
        scheduler: any diffusers scheduler; a fresh copy is made from its config, the caller's is left untouched.
        class_labels: for a class-conditional denoiser, one label for all samples or one per sample; ``None``
            gives balanced labels ``i % num_classes``. Must be ``None`` for an unconditional denoiser.
        generator: a CPU generator to draw from instead of ``torch.Generator().manual_seed(seed)``.
        eta: DDIM's noise factor (only for schedulers whose ``step`` takes ``eta``).
        device: where the denoiser runs; defaults to the denoiser's own device (it is not moved).

    Returns:
        ``images`` in model space (not clamped) as CPU float32 of shape ``(num_samples, C, H, W)``, and the
        CPU int64 labels used (``None`` for an unconditional denoiser).
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    elif generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (samples must not depend on the device), got {generator.device}")
    model_device, dtype = _device_and_dtype(unet)
    device = torch.device(device) if device is not None else model_device
    labels = _resolve_labels(unet, num_samples, class_labels)

    step_params = inspect.signature(scheduler.step).parameters
    if eta != 0.0 and "eta" not in step_params:
        raise ValueError(f"eta={eta} was given but {type(scheduler).__name__}.step takes no eta")
    step_kwargs = {"eta": eta} if "eta" in step_params else {}

    shape = (num_samples, unet.config.in_channels, *_sample_hw(unet.config.sample_size))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    step_seeds = None
    if "generator" in step_params:
        step_seeds = torch.randint(0, 2**62, (num_samples,), generator=generator).tolist()

    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(num_inference_steps, device=device)
    num_batches = math.ceil(num_samples / batch_size)
    progress = tqdm(
        total=num_batches * len(fresh.timesteps),
        desc="sampling",
        disable=not (show_progress and dlogging.is_progress_bar_enabled()),
    )
    outputs = []
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        # set_timesteps resets the per-run state (step index, ...) of stateful schedulers such as Euler.
        fresh.set_timesteps(num_inference_steps, device=device)
        if step_seeds is not None:
            step_kwargs["generator"] = [torch.Generator().manual_seed(s) for s in step_seeds[start:stop]]
        y = labels[start:stop].to(device) if labels is not None else None
        x = noise[start:stop].to(device=device, dtype=dtype) * fresh.init_noise_sigma
        for t in fresh.timesteps:
            model_input = fresh.scale_model_input(x, t)
            model_output = unet(model_input, t, class_labels=y).sample
            x = fresh.step(model_output, t, x, **step_kwargs).prev_sample
            progress.update(1)
        outputs.append(x.float().cpu())
    progress.close()
    return torch.cat(outputs), labels


def _sample_hw(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(sample_size, int):
        return sample_size, sample_size
    return tuple(sample_size)


def image_grid(images: torch.Tensor, *, nrow: int | None = None, scale: int | None = None, padding: int = 1) -> Image.Image:
    """Tile model-space images (``(N, C, H, W)`` in ``[-1, 1]``, C = 1 or 3) into one PIL image.

    ``nrow`` images per row (default: a square-ish grid); tiny images are enlarged ``scale`` times with nearest
    neighbours (default: to at least 32 pixels a side).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    scale = scale or max(1, math.ceil(32 / min(h, w)))
    num_rows = math.ceil(n / nrow)
    pixels = (to_unit_range(images.detach().float().cpu()) * 255).round().to(torch.uint8).numpy()
    grid = np.zeros((c, num_rows * (h + padding) + padding, nrow * (w + padding) + padding), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = pixels[i]
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return Image.fromarray(grid[0] if c == 1 else np.ascontiguousarray(grid.transpose(1, 2, 0)))
