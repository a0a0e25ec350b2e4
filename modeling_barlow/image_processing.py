"""The image processor that matches a Barlow Twins backbone's preprocessing."""

from __future__ import annotations

import math

from transformers import BitImageProcessor
from transformers.image_utils import PILImageResampling

from .configuration_barlow_twins import BarlowTwinsConfig


__all__ = ["create_image_processor"]

_RESAMPLE = {
    "bicubic": PILImageResampling.BICUBIC,
    "bilinear": PILImageResampling.BILINEAR,
    "nearest": PILImageResampling.NEAREST,
}


def create_image_processor(config: BarlowTwinsConfig) -> BitImageProcessor:
    """A stock `BitImageProcessor` doing timm's evaluation transform for `config`: resize the
    short side to `floor(image_size / crop_pct)`, centre-crop `image_size`, scale to [0, 1] and
    normalise with the config's mean and std. It always gives RGB (B, 3, S, S), also for
    one-channel encoders, which turn it into luminance (see `BarlowTwinsModel.forward`).

    Its `save_pretrained` writes `preprocessor_config.json`, which `AutoImageProcessor` and the
    pipelines read back with no custom code. HF's centre crop can sit 1 px off timm's when the
    margin is odd, so the two agree closely but not bit for bit.

    Example:
        >>> from modeling_barlow import BarlowTwinsConfig, create_image_processor
        >>> processor = create_image_processor(BarlowTwinsConfig(backbone="resnet18", projector_dims=[64]))
        >>> processor.crop_size
        {'height': 224, 'width': 224}
    """
    size = config.image_size
    # One mean and std per channel of the RGB images the processor gives: a one-channel model
    # turns them into luminance itself (pipelines always hand images over as RGB).
    channels = 3 if config.num_channels == 1 else 1
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": math.floor(size / config.crop_pct)},
        resample=_RESAMPLE[config.interpolation],
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(config.image_mean) * channels,
        image_std=list(config.image_std) * channels,
        do_convert_rgb=True,
    )
