"""Seeded sampling and the metrics that compare a (quantized) denoiser with its full-precision reference."""

from .classifier import DigitsClassifier
from .evaluate import EvalResult, MetricFloor, evaluate_denoiser, format_mean_std, metric_floor, summarize
from .metrics import (
    class_accuracy,
    classifier_features,
    frechet_distance,
    psnr,
    torchmetrics_fid,
    torchmetrics_inception_score,
)
from .sampling import balanced_labels, image_grid, num_class_labels, sample_images

__all__ = [
    "DigitsClassifier",
    "EvalResult",
    "MetricFloor",
    "balanced_labels",
    "class_accuracy",
    "classifier_features",
    "evaluate_denoiser",
    "format_mean_std",
    "frechet_distance",
    "image_grid",
    "metric_floor",
    "num_class_labels",
    "psnr",
    "sample_images",
    "summarize",
    "torchmetrics_fid",
    "torchmetrics_inception_score",
]
