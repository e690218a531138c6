"""Images for people to look at: model-space tensors to pixels, and a grid of samples."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map model-space images in ``[-1, 1]`` to ``[0, 1]`` (clamped)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


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
