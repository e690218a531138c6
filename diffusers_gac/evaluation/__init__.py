"""Seeded sampling and the metrics that compare a (quantized) denoiser with its full-precision reference."""

from ..sampling import balanced_labels, num_class_labels, sample_images
from .evaluate import (
    EVAL_SEED_OFFSET,
    EvalResult,
    MetricFloor,
    evaluate_denoiser,
    evaluation_seed,
    format_mean_std,
    metric_floor,
    refuse_non_finite,
    score_samples,
    summarize,
    trajectory_error,
)
from .images import image_grid, to_unit_range
from .metrics import (
    class_accuracy,
    classifier_features,
    frechet_distance,
    psnr,
    torchmetrics_fid,
    torchmetrics_inception_score,
)

__all__ = [
    "EVAL_SEED_OFFSET",
    "EvalResult",
    "MetricFloor",
    "balanced_labels",
    "class_accuracy",
    "classifier_features",
    "evaluate_denoiser",
    "evaluation_seed",
    "format_mean_std",
    "frechet_distance",
    "image_grid",
    "metric_floor",
    "num_class_labels",
    "psnr",
    "refuse_non_finite",
    "sample_images",
    "score_samples",
    "summarize",
    "to_unit_range",
    "torchmetrics_fid",
    "torchmetrics_inception_score",
    "trajectory_error",
]
