"""Sample-quality metrics: PSNR against reference samples, Frechet distance of features, classifier accuracy.

The digits metrics use the small :class:`~diffusers_gac.zoo.DigitsClassifier`; for RGB image
models, :func:`torchmetrics_fid` and :func:`torchmetrics_inception_score` wrap torchmetrics (the ``eval`` extra).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .images import to_unit_range

ArrayLike = torch.Tensor | np.ndarray


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over images of the per-image PSNR in dB, both sets clamped to ``[-1, 1]`` first.

    An image identical to its reference has an infinite PSNR, so the mean is ``float('inf')`` as soon as one image
    is reproduced exactly (a model compared with itself gives ``inf``).
    """
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    a = images.detach().double().cpu().clamp(-1, 1)
    b = reference.detach().double().cpu().clamp(-1, 1)
    mse = (a - b).flatten(1).pow(2).mean(dim=1)
    # 10 * log10(range^2 / 0) is +inf in floating point, which is the documented value for exact copies.
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(data_range**2 / mse.numpy())
    return float(per_image.mean())


def _as_float64(feats: ArrayLike, name: str) -> np.ndarray:
    x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a (num_samples >= 2, dim) array, got shape {x.shape}")
    return x


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two feature sets of shape ``(N, D)`` (the FID formula).

    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``. The trace of the matrix square root is taken as
    ``sum(sqrt(eig(C_a^(1/2) C_b C_a^(1/2))))``, a symmetric positive semi-definite matrix, so it is real
    without the imaginary round-off of a general ``sqrtm``. Round-off below zero is returned as ``0.0``.
    """
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    evals, evecs = np.linalg.eigh(cov_a)
    sqrt_a = (evecs * np.sqrt(evals.clip(min=0))) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(value, 0.0)


@torch.no_grad()
def _batched(fn, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``classifier.features`` of ``images`` (run where the classifier lives), as CPU float32 ``(N, D)``."""
    return _batched(classifier.features, images, batch_size, _device_of(classifier))


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    logits = _batched(classifier, images, batch_size, _device_of(classifier))
    return float((logits.argmax(-1) == labels.cpu()).float().mean())


def _torchmetrics_image(metric_name: str, caller: str):
    try:
        import torchmetrics.image
    except ImportError as err:
        raise ImportError(
            f"{caller} needs torchmetrics[image], which is not installed; "
            "install the eval extra: pip install 'diffusers-gac[eval]'"
        ) from err
    return getattr(torchmetrics.image, metric_name)


def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected model-space images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = (to_unit_range(images.detach().float()) * 255).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def torchmetrics_fid(
    images: torch.Tensor,
    reference: torch.Tensor,
    *,
    feature: int = 2048,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> float:
    """FID of model-space images (``[-1, 1]``) against reference images with torchmetrics' Inception network.

    For real RGB image models; needs ``torchmetrics[image]`` (the ``eval`` extra) and the Inception weights.
    """
    metric = _torchmetrics_image("FrechetInceptionDistance", "torchmetrics_fid")(feature=feature).to(device or "cpu")
    for real, batch in ((True, reference), (False, images)):
        for i in range(0, len(batch), batch_size):
            metric.update(_to_uint8_rgb(batch[i : i + batch_size]).to(metric.device), real=real)
    return float(metric.compute())


def torchmetrics_inception_score(
    images: torch.Tensor, *, splits: int = 10, batch_size: int = 64, device: str | torch.device | None = None
) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` of model-space images with torchmetrics (the ``eval`` extra)."""
    metric = _torchmetrics_image("InceptionScore", "torchmetrics_inception_score")(splits=splits).to(device or "cpu")
    for i in range(0, len(images), batch_size):
        metric.update(_to_uint8_rgb(images[i : i + batch_size]).to(metric.device))
    mean, std = metric.compute()
    return float(mean), float(std)
