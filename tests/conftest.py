"""Shared fixtures: tiny configs and real images that ship with scikit-learn (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


# Small enough for a 2-core CPU: ResNet-18 with narrowed stages (128-d features).
TINY_RESNET = {"backbone": "resnet18", "backbone_kwargs": {"channels": [16, 32, 64, 128]}, "projector_dims": [64, 64]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def tiny_config():
    from modeling_barlow import BarlowTwinsConfig

    return BarlowTwinsConfig(**TINY_RESNET, image_size=32)


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A real photograph shipped with scikit-learn, downsized."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).resize((160, 120))


@pytest.fixture(scope="session")
def digit_images() -> list[Image.Image]:
    """Real handwritten digits shipped with scikit-learn, as small RGB PIL images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return [Image.fromarray((img * 255 / 16).astype(np.uint8)).convert("RGB").resize((32, 32)) for img in digits.images[:64]]
