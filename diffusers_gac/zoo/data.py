"""The digits data set behind the embedded model: scikit-learn's ``load_digits`` (8x8, 10 classes).

The split is fixed once and for all (a seeded, class-stratified shuffle), so the model and the classifier are
trained on ``train`` only and every metric compares against the held-out ``test`` images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

SPLIT_SEED = 0
TEST_FRACTION = 0.2
NUM_CLASSES = 10
IMAGE_SIZE = 8

Split = Literal["train", "test"]


def _split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def load_digits_split(split: Split = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split.

    Images are float32 of shape ``(N, 1, 8, 8)`` scaled to ``[-1, 1]`` (the range the diffusion model works in);
    labels are int64 of shape ``(N,)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = _split_indices(digits.target)[split]
    images = torch.from_numpy(digits.images[idx].astype(np.float32)) / 16.0 * 2.0 - 1.0
    labels = torch.from_numpy(digits.target[idx].astype(np.int64))
    return images.unsqueeze(1), labels
