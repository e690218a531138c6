"""The feature network behind the photo-patches Frechet distance.

A small CNN is trained to tell which source photo a 16x16 patch comes from (on the training split only); its
penultimate activations are the feature space of the FD, its logits give a source-photo accuracy. The
augmentation is deliberately mild (horizontal flips, faint noise): the features should stay sensitive to the
colour shifts and grain that quantization adds to generated patches.

The training split holds only a few hundred non-overlapping patches' worth of pixels, so the network is kept
small and regularised (global average pooling, dropout, weight decay, label smoothing) to limit how much it
memorises its training patches: a memorising network scores unseen real patches (and generated ones) as far from
the training patches, which inflates and destabilises FD(train, test).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .classifier import save_network
from .photos_data import NUM_SOURCES, SOURCE_NAMES, PatchSampler, load_test_set

FEATURE_DIM = 128


class PhotoPatchClassifier(nn.Module):
    """Input ``(N, 3, 16, 16)`` in ``[-1, 1]``; ``features`` gives ``(N, feature_dim)``, ``forward`` the logits over
    the source photos."""

    def __init__(
        self, num_classes: int = NUM_SOURCES, feature_dim: int = FEATURE_DIM, width: int = 32, dropout: float = 0.5
    ):
        super().__init__()
        self.num_classes, self.feature_dim, self.width, self.dropout = num_classes, feature_dim, width, dropout
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(4 * width, 4 * width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(N, feature_dim)``: the space the Frechet distance is measured in."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` over the source photos."""
        return self.head(self.features(x))

    def save_pretrained(self, folder: str | Path, **extra) -> None:
        """Write ``config.json`` (architecture plus ``extra`` entries) and ``model.safetensors`` into ``folder``."""
        save_network(self, folder, {"num_classes": self.num_classes, "feature_dim": self.feature_dim, "width": self.width,
                                    "dropout": self.dropout, **extra})

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None) -> PhotoPatchClassifier:
        """Load a network written by :meth:`save_pretrained` (in eval mode, on ``device`` if given)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no photo-patch classifier in {folder} (config.json missing)")
        config = json.loads((folder / "config.json").read_text())
        model = cls(
            num_classes=config["num_classes"],
            feature_dim=config["feature_dim"],
            width=config["width"],
            dropout=config.get("dropout", 0.0),
        )
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(device).eval() if device is not None else model.eval()


@dataclass
class FeatureTrainingArgs:
    """Training of the feature network: ``steps`` AdamW steps on fresh training patches, cosine learning rate."""

    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    dropout: float = 0.5
    label_smoothing: float = 0.2
    max_noise: float = 0.05
    seed: int = 0


def augment(x: torch.Tensor, generator: torch.Generator, max_noise: float) -> torch.Tensor:
    """Random horizontal flips and Gaussian noise of a per-patch std drawn uniformly from ``[0, max_noise]``."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    std = max_noise * torch.rand(len(x), 1, 1, 1, generator=generator)
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``images`` whose predicted source photo is ``labels`` (run where ``model`` lives)."""
    device = next(model.parameters()).device
    preds = torch.cat([model(images[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(images), batch_size)])
    return float((preds == labels).float().mean())


def train_feature_network(
    args: FeatureTrainingArgs, device: str | torch.device = "cpu"
) -> tuple[PhotoPatchClassifier, dict]:
    """Train the feature network on the training split; return it (eval mode) and a summary with the accuracy on
    the held-out test patches and the training time."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sampler = PatchSampler("train", seed=args.seed)
    model = PhotoPatchClassifier(dropout=args.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(args.steps):
        x, y = sampler.sample(args.batch_size)
        x = augment(x, gen, args.max_noise)
        loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test_x, test_y = load_test_set()
    summary = {
        "test_accuracy": round(accuracy(model, test_x, test_y), 4),
        "train_accuracy": round(accuracy(model, *PatchSampler("train", seed=args.seed + 1).sample(4096)), 4),
        "wall_s": round(time.perf_counter() - start_wall, 1),
        "cpu_s": round(time.process_time() - start_cpu, 1),
        "classes": list(SOURCE_NAMES),
        "args": asdict(args),
    }
    return model, summary
