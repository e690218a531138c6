"""Models shipped inside the package. ``digits`` is the default for every command and test."""

from __future__ import annotations

from pathlib import Path

from diffusers import DDIMScheduler, UNet2DModel

from ..evaluation.classifier import DigitsClassifier

EMBEDDED_MODELS = {"digits": Path(__file__).parent / "digits"}
DEFAULT_MODEL = "digits"


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of an embedded model (``unet/``, ``scheduler/``, ``classifier/``)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    path = EMBEDDED_MODELS[name]
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded model {name!r} is missing from {path}; regenerate it with "
            f"`python examples/train_embedded_model.py --output {path}`"
        )
    return path


def load_embedded_unet(name: str = DEFAULT_MODEL, **kwargs) -> UNet2DModel:
    """Load the embedded denoiser with diffusers' own ``from_pretrained`` (kwargs are passed through)."""
    return UNet2DModel.from_pretrained(embedded_model_path(name), subfolder="unet", **kwargs)


def load_embedded_scheduler(name: str = DEFAULT_MODEL) -> DDIMScheduler:
    """The embedded model's noise schedule as a DDIM sampler (the evaluation default)."""
    return DDIMScheduler.from_pretrained(embedded_model_path(name), subfolder="scheduler")


def load_digits_classifier(name: str = DEFAULT_MODEL) -> DigitsClassifier:
    """The feature network behind the digits metrics (trained on the training split only)."""
    return DigitsClassifier.from_pretrained(embedded_model_path(name) / "classifier")


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "embedded_model_path",
    "load_digits_classifier",
    "load_embedded_scheduler",
    "load_embedded_unet",
]
