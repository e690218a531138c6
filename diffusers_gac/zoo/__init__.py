"""Models shipped inside the package, each with what its evaluation needs (a feature network for FD, real images).

* ``digits`` (the default for every command and test): a class-conditional ``UNet2DModel`` on scikit-learn's 8x8
  digits; its metrics classifier defines FD and class accuracy.
* ``photos``: an unconditional RGB ``UNet2DModel`` on 16x16 patches of the colour photographs in scikit-image's
  wheel, a harder model on which quantization leaves a clear gap; a photo-source classifier defines its FD (its
  data needs scikit-image, the ``photos`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DModel

from .classifier import DigitsClassifier
from .data import load_digits_split
from .photos_data import load_test_patches, load_test_set, sample_labeled_patches, sample_patches
from .photos_features import PhotoPatchClassifier

EMBEDDED_MODELS = {"digits": Path(__file__).parent / "digits", "photos": Path(__file__).parent / "photos"}
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


def load_feature_network(name: str = DEFAULT_MODEL) -> torch.nn.Module:
    """The network whose features define an embedded model's Frechet distance (``features(x)``) and, for a
    class-conditional model, its class accuracy (``forward(x)``)."""
    path = embedded_model_path(name)
    if name == "photos":
        return PhotoPatchClassifier.from_pretrained(path / "features")
    return load_digits_classifier(name)


def load_real_images(name: str = DEFAULT_MODEL, split: str = "test") -> torch.Tensor:
    """Real images of an embedded model's data (model space, ``[-1, 1]``): ``"test"`` is what FD compares with
    (for ``photos``: its fixed set of 4096 held-out patches; ``"train"``: 4096 seeded training patches)."""
    embedded_model_path(name)
    if name == "photos":
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return load_test_patches() if split == "test" else sample_patches("train", 4096, seed=0)
    return load_digits_split(split)[0]


def load_labeled_images(name: str = DEFAULT_MODEL, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Real images with their labels: digit classes for ``digits``, source-photo indices for ``photos`` (the
    labels its feature network predicts)."""
    embedded_model_path(name)
    if name == "photos":
        return load_test_set() if split == "test" else sample_labeled_patches("train", 4096, seed=0)
    return load_digits_split(split)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Folder of a model given as an embedded name (``"digits"``) or a path.

    A path must hold either a diffusers model (``config.json``) or a pipeline-like layout with ``unet/`` (and
    optionally ``scheduler/``). An embedded name wins over a relative folder of the same name.
    """
    if isinstance(name_or_path, str) and name_or_path in EMBEDDED_MODELS:
        return embedded_model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither an embedded model (available: {sorted(EMBEDDED_MODELS)}) "
            f"nor an existing folder ({path.resolve()} does not exist)"
        )
    if not path.is_dir() or not ((path / "config.json").is_file() or (path / "unet" / "config.json").is_file()):
        raise FileNotFoundError(f"{path} is not a model folder: expected {path / 'config.json'} or {path / 'unet' / 'config.json'}")
    return path


def load_model(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device | None = None):
    """Load ``(unet, scheduler)`` from an embedded name or a folder (see :func:`resolve_model_path`).

    The denoiser's class is read from its ``config.json`` (``_class_name``, e.g. ``UNet2DModel``) and loaded with
    its own ``from_pretrained``, so quantized checkpoints go through their diffusers quantizer. The scheduler is a
    ``DDIMScheduler`` built from the folder's ``scheduler/`` config when there is one, and otherwise from the
    embedded digits model's schedule (the evaluation default).
    """
    path = resolve_model_path(name_or_path)
    subfolder = "unet" if (path / "unet" / "config.json").is_file() else None
    config = json.loads((path / (subfolder or "") / "config.json").read_text())
    model_cls = getattr(diffusers, config.get("_class_name", "UNet2DModel"), None)
    if model_cls is None or not hasattr(model_cls, "from_pretrained"):
        raise ValueError(f"{path}: unknown diffusers model class {config.get('_class_name')!r} in config.json")
    unet = model_cls.from_pretrained(path, subfolder=subfolder)
    if device is not None:
        unet = unet.to(device)
    if (path / "scheduler" / "scheduler_config.json").is_file():
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    else:
        scheduler = load_embedded_scheduler(DEFAULT_MODEL)
    return unet.eval(), scheduler


__all__ = [
    "DEFAULT_MODEL",
    "DigitsClassifier",
    "PhotoPatchClassifier",
    "EMBEDDED_MODELS",
    "embedded_model_path",
    "load_digits_classifier",
    "load_digits_split",
    "load_embedded_scheduler",
    "load_embedded_unet",
    "load_feature_network",
    "load_labeled_images",
    "load_real_images",
    "load_model",
    "resolve_model_path",
]
