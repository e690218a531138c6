"""The photo-patches data set: 16x16 RGB patches of the colour photographs that ship inside scikit-image.

Only photographs bundled in the scikit-image wheel are used (no ``pooch`` download is ever needed); synthetic
images (``colorwheel``, ``logo``) and duplicates (``cat`` is ``chelsea``, the right motorcycle view repeats the
left one) are left out. Each photo is first shrunk by an integer box average (``downscale``) so that a 16x16 patch
holds structure (an eye, an edge, a few galaxies) rather than flat colour.

The split is spatial and fixed once and for all: every (downscaled) photo is cut into a grid of cells of about
``CELL_SIZE`` pixels and a seeded ``TEST_FRACTION`` of the cells of each photo is held out, spread over the whole
photo. A training patch lies entirely inside training cells and a test patch entirely inside test cells, so no
pixel is shared between the two splits.

Patches are drawn with equal probability from each photo, then uniformly over the positions allowed in that photo's
split. Everything is seeded: the same ``(split, n, seed)`` always gives the same patches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

PATCH_SIZE = 16
CELL_SIZE = 24
TEST_FRACTION = 0.25
SPLIT_SEED = 0
TEST_SET_SIZE = 4096
TEST_SET_SEED = 1234

Split = Literal["train", "test"]


@dataclass(frozen=True)
class PhotoSource:
    """One photograph: the ``skimage.data`` loader that returns it and the integer box-downscale factor."""

    name: str
    downscale: int


# Factors chosen by looking at patches: 16x16 crops then cover 48-64 original pixels (128 for the 1411 px retina).
SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", 4),
    PhotoSource("chelsea", 3),
    PhotoSource("coffee", 3),
    PhotoSource("rocket", 4),
    PhotoSource("hubble_deep_field", 4),
    PhotoSource("immunohistochemistry", 4),
    PhotoSource("retina", 8),
    PhotoSource("motorcycle_left", 3),
)
NUM_SOURCES = len(SOURCES)
SOURCE_NAMES: tuple[str, ...] = tuple(s.name for s in SOURCES)


def _load_rgb(name: str) -> np.ndarray:
    """The uint8 ``(H, W, 3)`` photo ``name`` from ``skimage.data`` (files inside the wheel, no download)."""
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("the photo-patches data set needs scikit-image: pip install scikit-image") from err
    if name == "motorcycle_left":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is not an RGB uint8 image: {image.shape} {image.dtype}")
    return image


def _box_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` pixel blocks (the ragged border is cropped); float64 output in ``[0, 255]``."""
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].astype(np.float64).reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.mean(axis=(1, 3))


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[torch.Tensor, ...]:
    """The downscaled photos as float32 ``(3, H, W)`` tensors in ``[-1, 1]``, in the order of :data:`SOURCES`."""
    photos = []
    for source in SOURCES:
        small = _box_downscale(_load_rgb(source.name), source.downscale)
        photos.append(torch.from_numpy((small / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1).copy()))
    return tuple(photos)


def test_mask(height: int, width: int, index: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of the held-out pixels of photo number ``index`` (its test cells)."""
    grid_h, grid_w = max(2, round(height / CELL_SIZE)), max(2, round(width / CELL_SIZE))
    rng = np.random.default_rng([SPLIT_SEED, index])
    cells = rng.choice(grid_h * grid_w, size=max(1, round(TEST_FRACTION * grid_h * grid_w)), replace=False)
    rows = np.linspace(0, height, grid_h + 1).round().astype(int)
    cols = np.linspace(0, width, grid_w + 1).round().astype(int)
    mask = np.zeros((height, width), dtype=bool)
    for cell in cells:
        r, c = divmod(int(cell), grid_w)
        mask[rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = True
    return mask


def _window_sums(mask: np.ndarray, size: int) -> np.ndarray:
    """Number of ``True`` pixels in every ``size x size`` window, indexed by the window's top-left corner."""
    integral = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]


@functools.lru_cache(maxsize=2)
def valid_positions(split: Split) -> tuple[np.ndarray, ...]:
    """Per photo, the ``(K, 2)`` int64 top-left corners ``(y, x)`` of the patches that lie wholly in ``split``."""
    _check_split(split)
    positions = []
    for index, photo in enumerate(load_photos()):
        counts = _window_sums(test_mask(photo.shape[1], photo.shape[2], index), PATCH_SIZE)
        inside = counts == PATCH_SIZE * PATCH_SIZE if split == "test" else counts == 0
        positions.append(np.argwhere(inside).astype(np.int64))
    return tuple(positions)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class PatchSampler:
    """An endless, seeded stream of patches of one split (one generator for the whole stream)."""

    def __init__(self, split: Split = "train", seed: int = 0):
        _check_split(split)
        self.split = split
        self.rng = np.random.default_rng(seed)
        self.photos = load_photos()
        self.positions = valid_positions(split)
        self._offsets = torch.arange(PATCH_SIZE)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` patches as float32 ``(n, 3, 16, 16)`` in ``[-1, 1]`` and their source-photo indices (int64 ``(n,)``)."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        sources = self.rng.integers(0, NUM_SOURCES, size=n)
        draws = self.rng.random(n)
        patches = torch.empty(n, 3, PATCH_SIZE, PATCH_SIZE)
        for index in np.unique(sources):
            rows = np.flatnonzero(sources == index)
            pos = self.positions[index]
            corners = torch.from_numpy(pos[(draws[rows] * len(pos)).astype(np.int64)])
            ys = (corners[:, 0:1] + self._offsets)[:, :, None]  # (m, 16, 1)
            xs = (corners[:, 1:2] + self._offsets)[:, None, :]  # (m, 1, 16)
            patches[torch.from_numpy(rows)] = self.photos[index][:, ys, xs].permute(1, 0, 2, 3)
        return patches, torch.from_numpy(sources.astype(np.int64))


def sample_patches(split: Split, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random patches of ``split`` as float32 ``(n, 3, 16, 16)`` in ``[-1, 1]``."""
    return PatchSampler(split, seed).sample(n)[0]


def sample_labeled_patches(split: Split, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`sample_patches`, also returning each patch's source-photo index."""
    return PatchSampler(split, seed).sample(n)


@functools.lru_cache(maxsize=1)
def _test_set() -> tuple[torch.Tensor, torch.Tensor]:
    return sample_labeled_patches("test", TEST_SET_SIZE, TEST_SET_SEED)


def load_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed real test patches FD compares with (``TEST_SET_SIZE`` of them) and their source indices."""
    patches, labels = _test_set()
    return patches.clone(), labels.clone()


def load_test_patches() -> torch.Tensor:
    """The fixed real test patches FD compares with: float32 ``(TEST_SET_SIZE, 3, 16, 16)`` in ``[-1, 1]``."""
    return load_test_set()[0]


def describe() -> list[dict]:
    """Per photo: name, downscale factor, downscaled size and the number of train / test patch positions."""
    train, test = valid_positions("train"), valid_positions("test")
    return [
        {
            "name": s.name,
            "downscale": s.downscale,
            "size": tuple(photo.shape[1:]),
            "train_positions": len(train[i]),
            "test_positions": len(test[i]),
        }
        for i, (s, photo) in enumerate(zip(SOURCES, load_photos()))
    ]
