"""A small CNN for 8x8 digits: its penultimate features define the Frechet distance, its logits the accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FEATURE_DIM = 128


def save_network(network: nn.Module, folder: str | Path, config: dict) -> None:
    """Write a feature network as ``config.json`` (``config``) and ``model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / "model.safetensors"))


class DigitsClassifier(nn.Module):
    """Input ``(N, 1, 8, 8)`` in ``[-1, 1]``; ``features`` gives ``(N, FEATURE_DIM)``, ``forward`` the 10 logits."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save_pretrained(self, folder: str | Path, **extra) -> None:
        save_network(self, folder, {"num_classes": self.num_classes, "feature_dim": self.feature_dim, **extra})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DigitsClassifier":
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no digits classifier in {folder} (config.json missing)")
        config = json.loads((folder / "config.json").read_text())
        model = cls(num_classes=config["num_classes"], feature_dim=config["feature_dim"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()
