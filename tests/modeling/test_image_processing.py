"""`create_image_processor` against the evaluation transform computed directly with PIL: resize the
short side to floor(image_size / crop_pct) with the config's filter, centre-crop, scale to [0, 1],
normalise per channel. The sizes are chosen so that both crop margins are even (no 1 px ambiguity
between centre-crop conventions), so the processor must match to float rounding. Fast enough for
mutation testing (benchmarks/mutation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_barlow import BarlowTwinsConfig, create_image_processor

from ..conftest import TINY_RESNET


MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _image(mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)  # 40 wide, 30 high
    return Image.fromarray(pixels).convert(mode)


def _direct(image: Image.Image, resample, mean, std) -> torch.Tensor:
    # image_size 16, crop_pct 0.8: short side 30 -> floor(16 / 0.8) = 20, long side 40 -> 26 (as
    # transformers rounds it down); then the centre 16 x 16: margins 10 and 4, 5 and 2 on each side.
    rgb = image.convert("RGB").resize((26, 20), resample).crop((5, 2, 21, 18))
    scaled = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1).double() / 255
    return ((scaled - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1))
            / torch.tensor(std, dtype=torch.float64).view(3, 1, 1)).float()


@pytest.mark.parametrize("interpolation", list(FILTERS))
def test_processor_is_the_evaluation_transform_with_the_configs_filter(interpolation):
    config = BarlowTwinsConfig(**TINY_RESNET, image_size=16, crop_pct=0.8, interpolation=interpolation,
                               image_mean=MEAN, image_std=STD)
    got = create_image_processor(config)(_image(), return_tensors="pt")["pixel_values"]
    assert got.shape == (1, 3, 16, 16)
    torch.testing.assert_close(got[0], _direct(_image(), FILTERS[interpolation], MEAN, STD), atol=1e-5, rtol=0)
    # The filters differ by far more than the tolerance, so the one used is the config's.
    for other, resample in FILTERS.items():
        if other != interpolation:
            assert (got[0] - _direct(_image(), resample, MEAN, STD)).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grey_and_transparent_images_become_rgb(mode):
    config = BarlowTwinsConfig(**TINY_RESNET, image_size=16, crop_pct=0.8, image_mean=MEAN, image_std=STD)
    image = _image(mode)
    got = create_image_processor(config)(image, return_tensors="pt")["pixel_values"]
    assert got.shape == (1, 3, 16, 16)
    torch.testing.assert_close(got[0], _direct(image, Image.BICUBIC, MEAN, STD), atol=1e-5, rtol=0)


def test_one_channel_model_gets_rgb_normalised_with_its_one_mean_and_std():
    # The model turns RGB into luminance itself; the processor gives RGB with the one statistic
    # repeated for each channel.
    config = BarlowTwinsConfig(**{**TINY_RESNET, "backbone_kwargs": {"in_chans": 1}}, image_size=16, crop_pct=0.8,
                               image_mean=[0.3], image_std=[0.4])
    assert config.num_channels == 1
    processor = create_image_processor(config)
    assert list(processor.image_mean) == [0.3] * 3 and list(processor.image_std) == [0.4] * 3
    got = processor(_image(), return_tensors="pt")["pixel_values"]
    assert got.shape == (1, 3, 16, 16)
    torch.testing.assert_close(got[0], _direct(_image(), Image.BICUBIC, [0.3] * 3, [0.4] * 3), atol=1e-5, rtol=0)
