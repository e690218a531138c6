"""Shared fixtures: the embedded digits model as shipped (loaded through diffusers), and a tiny random UNet for
the checks that must not depend on a trained model (dtype, unconditional models, stochastic schedulers)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton's interpreter runs the GPU kernels on CPU tensors (test_gpu_kernels.py). It is chosen when Triton is
    # imported, which diffusers' and the peers' imports may do, so before anything else is.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from diffusers import UNet2DModel

from diffusers_gac import zoo
from diffusers_gac.zoo.training import digits_unet_config


@pytest.fixture(scope="session")
def digits_unet() -> UNet2DModel:
    return zoo.load_embedded_unet().eval()


@pytest.fixture(scope="session")
def digits_scheduler():
    return zoo.load_embedded_scheduler()


@pytest.fixture(scope="session")
def digits_classifier():
    return zoo.load_digits_classifier()


def tiny_unet_config(**overrides) -> dict:
    """The embedded architecture with narrow channels: same interface, instant forward passes."""
    config = digits_unet_config()
    config.update(block_out_channels=(8, 8, 8), norm_num_groups=4, attention_head_dim=4)
    config.update(overrides)
    return config


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**tiny_unet_config()).eval()
