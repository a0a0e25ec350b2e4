"""The paper's augmentation parameters (one place for them) and their checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torchvision.transforms import v2

BICUBIC = v2.InterpolationMode.BICUBIC


@dataclass(frozen=True)
class ViewAugmentationParams:
    """Parameters of one view's augmentation pipeline. Probabilities are per image."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4  # factor ~ U[max(0, 1 - s), 1 + s]
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # shift ~ U[-h, h], in turns of the colour wheel
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels, sigma ~ U[lo, hi]
    blur_kernel_fraction: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: float = 128.0  # on the 0..255 scale; pixels >= threshold are inverted

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("jitter strengths must be >= 0 and hue in [0, 0.5]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be 0 < lo <= hi, got {self.blur_sigma}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be 0 < lo <= hi <= 1, got {self.crop_scale}")

    def blur_kernel_size(self, image_size: int) -> int:
        """Odd blur kernel side for an image of side ``image_size``.

        Rule (SimCLR/BYOL practice): 10% of the side, made odd by rounding up, so 224 px -> 23 as in
        BYOL; at least 3 so that small images (28-32 px) still get a real blur.
        """
        k = int(self.blur_kernel_fraction * image_size)
        k += 1 - k % 2
        return max(k, 3)


# The two views differ only in blur and solarisation probabilities (BYOL, Table 6).
BARLOW_TWINS_VIEW1 = ViewAugmentationParams(blur_p=1.0, solarize_p=0.0)
BARLOW_TWINS_VIEW2 = ViewAugmentationParams(blur_p=0.1, solarize_p=0.2)


def barlow_twins_view_params() -> tuple[ViewAugmentationParams, ViewAugmentationParams]:
    """The paper's (view 1, view 2) parameters."""
    return BARLOW_TWINS_VIEW1, BARLOW_TWINS_VIEW2


def _check_channels(num_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if num_channels not in (1, 3) or len(mean) != num_channels or len(std) != num_channels:
        raise ValueError(f"need num_channels 1 or 3 and that many mean/std values: {num_channels}, {mean}, {std}")
