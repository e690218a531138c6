"""The photo-patches data set and feature network behind the second embedded model."""

from __future__ import annotations

import numpy as np
import torch

from diffusers_gac.zoo import photos_data as pdata
from diffusers_gac.zoo.photos_features import PhotoPatchClassifier


def test_sources_load_without_download():
    photos = pdata.load_photos()
    assert len(photos) == pdata.NUM_SOURCES
    for photo in photos:
        assert photo.dtype == torch.float32 and photo.shape[0] == 3
        assert min(photo.shape[1:]) >= 4 * pdata.PATCH_SIZE
        assert -1.0 <= float(photo.min()) and float(photo.max()) <= 1.0


def test_splits_are_pixel_disjoint():
    for index, photo in enumerate(pdata.load_photos()):
        mask = pdata.test_mask(photo.shape[1], photo.shape[2], index)
        assert 0.1 < mask.mean() < 0.4
        for split, expected in (("train", 0), ("test", pdata.PATCH_SIZE**2)):
            corners = pdata.valid_positions(split)[index]
            assert len(corners) > 100
            for y, x in corners[:: max(1, len(corners) // 200)]:
                assert mask[y : y + pdata.PATCH_SIZE, x : x + pdata.PATCH_SIZE].sum() == expected


def test_sampling_is_seeded_and_shaped():
    a, la = pdata.sample_labeled_patches("train", 300, seed=7)
    b, lb = pdata.sample_labeled_patches("train", 300, seed=7)
    c = pdata.sample_patches("train", 300, seed=8)
    assert a.shape == (300, 3, pdata.PATCH_SIZE, pdata.PATCH_SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert set(np.unique(la.numpy())) == set(range(pdata.NUM_SOURCES))
    assert a.min() >= -1 and a.max() <= 1


def test_test_set_is_fixed():
    first, labels = pdata.load_test_set()
    assert first.shape == (pdata.TEST_SET_SIZE, 3, pdata.PATCH_SIZE, pdata.PATCH_SIZE)
    first[0] = 0  # a copy: the cached set must not change
    assert not torch.equal(first, pdata.load_test_patches())
    assert torch.equal(pdata.load_test_set()[1], labels)


def test_feature_network_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PhotoPatchClassifier().eval()
    x = pdata.sample_patches("test", 8, seed=0)
    model.save_pretrained(tmp_path / "features", note="test")
    loaded = PhotoPatchClassifier.from_pretrained(tmp_path / "features")
    assert torch.equal(model.features(x), loaded.features(x))
    assert loaded(x).shape == (8, pdata.NUM_SOURCES)
