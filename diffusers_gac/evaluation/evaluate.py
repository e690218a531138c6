"""One evaluation of a denoiser: seeded samples, then FD, PSNR and classifier accuracy on them.

The defaults measure the embedded digits model: the features and labels come from the embedded digits
classifier, and FD compares with the held-out test split (which neither the model nor the classifier saw).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..sampling import sample_images
from ..zoo import load_digits_classifier, load_digits_split, load_feature_network, load_labeled_images, load_real_images
from .metrics import class_accuracy, classifier_features, frechet_distance, psnr


@dataclass
class EvalResult:
    """Metrics of one sampling run. ``psnr`` (mean over images) and ``mse`` (mean squared difference per pixel, in
    model space) compare with the reference samples and are ``None`` without one (``psnr`` is ``inf`` for identical
    samples); ``accuracy`` is ``None`` for an unconditional model."""

    fd: float
    psnr: float | None
    accuracy: float | None
    num_samples: int
    num_inference_steps: int
    seed: int
    scheduler: str
    sampling_seconds: float
    mse: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MetricFloor:
    """The best a generator can hope for: real test images scored against real train images (and the feature
    network's accuracy on the test images' labels: digit classes, or source photos)."""

    fd: float
    accuracy: float
    num_test: int
    num_train: int

    def to_dict(self) -> dict:
        return asdict(self)


EVAL_SEED_OFFSET = 1000


def evaluation_seed(calibration_seed: int) -> int:
    """The evaluation seed of a model calibrated with ``calibration_seed``: ``calibration_seed + 1000``.

    Calibration records its trajectories from the noise of ``calibration_seed`` (:func:`sample_images` seeds), so
    evaluating with the same seed would start the first samples from the very noise the model was calibrated on.
    """
    return calibration_seed + EVAL_SEED_OFFSET


def evaluate_denoiser(
    unet: nn.Module,
    scheduler,
    *,
    reference_unet: nn.Module | None = None,
    reference_images: torch.Tensor | None = None,
    num_samples: int = 1000,
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 256,
    classifier: nn.Module | None = None,
    real_images: torch.Tensor | None = None,
    show_progress: bool = True,
) -> EvalResult:
    """Sample ``unet`` and score the samples (clamped to ``[-1, 1]``).

    Args:
        reference_unet: the full-precision model; it is sampled from the same noise and labels and ``psnr`` is
            measured against its samples. Passing ``unet`` itself reuses the samples (``psnr`` is ``inf``).
        reference_images: precomputed reference samples, i.e. ``sample_images(reference_unet, scheduler,
            num_samples, num_inference_steps=..., seed=...)[0]`` with the same settings; they avoid resampling
            the reference when several models are compared. Takes precedence over ``reference_unet``.
        classifier: feature network with ``features(x)`` and logits ``forward(x)``; default: the embedded digits
            classifier.
        real_images: images FD compares with; default: the held-out digits test split.
        seed: seed of the noise (and labels) sampled from; for a calibrated model, not its calibration seed
            (:func:`evaluation_seed` gives the package's convention).
    """
    sampling = dict(
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
        seed=seed,
        show_progress=show_progress,
    )
    start = time.perf_counter()
    samples, labels = sample_images(unet, scheduler, num_samples, **sampling)
    seconds = time.perf_counter() - start
    refuse_non_finite(samples, f"{type(unet).__name__}'s samples")
    if reference_images is None and reference_unet is unet:
        reference_images = samples
    elif reference_images is None and reference_unet is not None:
        reference_images, _ = sample_images(reference_unet, scheduler, num_samples, class_labels=labels, **sampling)
    return EvalResult(
        **score_samples(samples, labels, reference_images=reference_images, classifier=classifier,
                        real_images=real_images, batch_size=batch_size),
        num_samples=num_samples,
        num_inference_steps=num_inference_steps,
        seed=seed,
        scheduler=type(scheduler).__name__,
        sampling_seconds=round(seconds, 3),
    )


def refuse_non_finite(images: torch.Tensor, what: str) -> None:
    """No image or metric is made from NaN or inf outputs (a damaged checkpoint gives them): they would turn into
    black pixels or a meaningless number."""
    bad = (~torch.isfinite(images)).flatten(1).any(1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} of {len(images)} hold non-finite values (NaN or inf), so no "
                         "image or metric was made from them; the model's weights are broken (a damaged checkpoint?)")


def score_samples(samples: torch.Tensor, labels: torch.Tensor | None, *, reference_images: torch.Tensor | None = None,
                  classifier: nn.Module | None = None, real_images: torch.Tensor | None = None,
                  batch_size: int = 256) -> dict[str, float | None]:
    """``fd``, ``psnr`` (against ``reference_images``, else None) and ``accuracy`` (for ``labels``, else None) of
    model-space samples, clamped to ``[-1, 1]`` first; defaults as in :func:`evaluate_denoiser`."""
    classifier = classifier if classifier is not None else load_digits_classifier()
    real_images = real_images if real_images is not None else load_digits_split("test")[0]
    if reference_images is not None and reference_images.shape != samples.shape:
        raise ValueError(
            f"reference_images has shape {tuple(reference_images.shape)} but the samples have shape "
            f"{tuple(samples.shape)}; sample the reference with the same num_samples"
        )
    samples = samples.clamp(-1, 1)
    fd = frechet_distance(
        classifier_features(classifier, samples, batch_size), classifier_features(classifier, real_images, batch_size)
    )
    compared = reference_images is not None
    return {
        "fd": fd,
        "psnr": psnr(samples, reference_images) if compared else None,
        "mse": (samples - reference_images.clamp(-1, 1)).pow(2).mean().item() if compared else None,
        "accuracy": class_accuracy(classifier, samples, labels, batch_size) if labels is not None else None,
    }


@torch.no_grad()
def trajectory_error(unet: nn.Module, reference_unet: nn.Module, scheduler, num_samples: int, *,
                     num_inference_steps: int = 25, seed: int = 0, batch_size: int = 256,
                     show_progress: bool = False) -> dict[str, Any]:
    """The denoiser's noise-prediction error against the reference's along the reference's own trajectories.

    The reference samples as :func:`sample_images` would (same seed, labels, noise); at every step ``unet`` predicts
    for the same input. Returns ``{"mse": mean squared difference over steps, samples and values, "per_step": [one
    value per sampler step]}``. Far steadier than sample metrics: no error compounds along a trajectory of its own.
    """
    sums = torch.zeros(num_inference_steps, dtype=torch.float64)

    def compare(step):
        error = (step.predict(unet) - step.prediction).double().pow(2)
        sums[step.index] += error.flatten(1).mean(1).sum().cpu()

    sample_images(reference_unet, scheduler, num_samples, num_inference_steps=num_inference_steps, seed=seed,
                  batch_size=batch_size, on_step=compare, show_progress=show_progress)
    per_step = (sums / num_samples).tolist()
    return {"mse": sum(per_step) / len(per_step), "per_step": per_step}


def metric_floor(classifier: nn.Module | None = None, model: str = "digits") -> MetricFloor:
    """FD of an embedded model's real test images against its real train images, and the feature network's accuracy
    on the test images (default: the digits and their classifier)."""
    classifier = classifier if classifier is not None else load_feature_network(model)
    test_images, test_labels = load_labeled_images(model, "test")
    train_images = load_real_images(model, "train")
    fd = frechet_distance(classifier_features(classifier, test_images), classifier_features(classifier, train_images))
    return MetricFloor(
        fd=fd,
        accuracy=class_accuracy(classifier, test_images, test_labels),
        num_test=len(test_images),
        num_train=len(train_images),
    )


def summarize(results: Sequence[EvalResult]) -> dict:
    """Mean and sample standard deviation of each metric over runs (seeds) of one model.

    Returns ``fd``, ``psnr``, ``mse``, ``accuracy`` (means) with ``fd_std``, ``psnr_std``, ``mse_std``,
    ``accuracy_std`` (``None`` for a single run), plus ``seeds``, ``num_samples`` and ``num_inference_steps``. A metric that is ``None`` in the runs
    stays ``None``; an infinite PSNR (identical samples) has mean ``inf`` and std ``0.0``.
    """
    if not results:
        raise ValueError("summarize needs at least one EvalResult")
    summary: dict = {}
    for key in ("fd", "psnr", "mse", "accuracy"):
        values = [getattr(r, key) for r in results]
        if any(v is None for v in values):
            summary[key], summary[f"{key}_std"] = None, None
            continue
        summary[key] = float(np.mean(values))
        if len(values) == 1:
            summary[f"{key}_std"] = None
        elif all(v == values[0] for v in values):
            summary[f"{key}_std"] = 0.0
        else:
            summary[f"{key}_std"] = float(np.std(values, ddof=1))
    summary["seeds"] = [r.seed for r in results]
    summary["num_samples"] = results[0].num_samples
    summary["num_inference_steps"] = results[0].num_inference_steps
    return summary


def format_mean_std(mean: float | None, std: float | None, digits: int = 2) -> str:
    """``"12.34 ± 0.56"`` (``"12.34"`` without a std, ``"-"`` for a missing metric)."""
    if mean is None:
        return "-"
    if math.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
