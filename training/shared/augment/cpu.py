"""CPU path: PIL image -> two normalised views in a DataLoader worker; the supervised transform."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

from .ops import _GRAY_WEIGHTS, _adjust_hue, _gray
from .params import BICUBIC, ViewAugmentationParams, _check_channels, barlow_twins_view_params


# --------------------------------------------------------------------------- CPU path
def _to_uint8_tensor(image: Image.Image | Tensor, num_channels: int) -> Tensor:
    """PIL image of any mode (or a uint8 (C, H, W) tensor) -> uint8 (num_channels, H, W)."""
    if isinstance(image, Tensor):
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns on P -> RGB with transparency
    # RGBA/LA: alpha is dropped, not composited, as torchvision's datasets do.
    mode = "RGB" if num_channels == 3 else "L"
    if image.mode != mode:  # convert() to the same mode would only copy
        image = image.convert(mode)
    return v2.functional.pil_to_tensor(image)


def _blur_image(x: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """Gaussian blur of one float (C, H, W) image; the same kernel and reflect padding as :func:`_blur`.

    Separable, as k shifted multiply-adds per axis: on one CPU thread (a DataLoader worker) this is
    as fast as a grouped conv2d at 224 px and several times faster on small images, where conv2d's
    set-up dominates.
    """
    _, h, w = x.shape
    half = (kernel_size - 1) / 2  # the taps of _gaussian_kernels, in Python (no tensor set-up per image)
    taps = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(kernel_size)]
    taps = [t / sum(taps) for t in taps]
    pad = kernel_size // 2
    y = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]
    rows = y[:, :, :w] * taps[0]
    for i in range(1, kernel_size):
        rows.add_(y[:, :, i:i + w], alpha=taps[i])
    out = rows[:, :h] * taps[0]
    for i in range(1, kernel_size):
        out.add_(rows[:, i:i + h], alpha=taps[i])
    return out


def _crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w): ``torchvision.transforms.RandomResizedCrop.get_params``' distribution (10
    tries of area ~ U[scale] x image area and log aspect ~ U[log ratio], then a central crop of the
    clamped aspect), with all its random numbers drawn from torch's RNG in one call."""
    area, log_lo, log_hi = height * width, math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(40).tolist()
    for attempt in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[4 * attempt])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[4 * attempt + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[4 * attempt + 2] * (height - h + 1)), int(u[4 * attempt + 3] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _RandomSigmaBlur(nn.Module):
    """Gaussian blur of a uint8 (C, H, W) tensor with sigma ~ U[lo, hi], rounded back to uint8 like
    ``v2.GaussianBlur`` (and drawing sigma as it does): the CPU path's blur kernel in isolation."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, sigma

    def forward(self, image: Tensor) -> Tensor:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        out = _blur_image(image.float(), sigma, self.kernel_size)
        return out.round_().clamp_(0, 255).to(torch.uint8)


class _ToNormalizedFloat(nn.Module):
    """uint8 (C, H, W) -> float32 ((x / 255) - mean) / std in one pass."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255

    def forward(self, image: Tensor) -> Tensor:
        return image.to(torch.float32).sub_(self.mean).div_(self.std)


def _crop(p: ViewAugmentationParams, image_size: int, interpolation: v2.InterpolationMode) -> nn.Module:
    return v2.RandomResizedCrop(image_size, p.crop_scale, p.crop_ratio, interpolation=interpolation, antialias=True)


class _CpuView:
    """One view on one image: uint8 (C, H, W) -> normalised float32 (C, S, S).

    The random-resized crop runs on uint8 (torchvision's kernel, rounded to uint8), so everything
    after it touches only S x S pixels; the view is then converted to float32 once, on the 0..255
    scale, and flip, colour jitter, grayscale, blur, solarisation and normalisation work in place
    on it, with no rounding between ops (as the device path). Each op is applied with its own
    probability and uniform parameters, drawn from torch's global RNG (seeded per DataLoader
    worker) in one call; ColorJitter's four ops run in a fresh uniformly random order. A grayscale
    view stays one channel until the normalisation broadcasts it to C equal channels.
    """

    _DRAWS = 14  # 5 coins, 4 jitter factors, 4 order keys, 1 blur sigma

    def __init__(
        self,
        p: ViewAugmentationParams,
        image_size: int,
        num_channels: int,
        interpolation: v2.InterpolationMode,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.p, self.size, self.interpolation = p, [image_size, image_size], interpolation
        self.rgb = num_channels == 3
        self.kernel_size = p.blur_kernel_size(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
        self.gray_weights = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float32)
        # Saturation, hue and grayscale are identities on one channel, and strength 0 is no op.
        strengths = (p.brightness, p.contrast, p.saturation if self.rgb else 0.0, p.hue if self.rgb else 0.0)
        self.jitter_ops = [op for op, s in enumerate(strengths) if s > 0]
        self.factor_lo = [max(0.0, 1 - p.brightness), max(0.0, 1 - p.contrast), max(0.0, 1 - p.saturation), -p.hue]
        self.factor_hi = [1 + p.brightness, 1 + p.contrast, 1 + p.saturation, p.hue]

    def __call__(self, image: Tensor) -> Tensor:
        p = self.p
        top, left, height, width = _crop_box(image.shape[-2], image.shape[-1], p.crop_scale, p.crop_ratio)
        x = v2.functional.resized_crop(image, top, left, height, width, self.size, self.interpolation, antialias=True)
        u = torch.rand(self._DRAWS).tolist()
        if u[0] < p.flip_p:
            x = x.flip(-1)
        x = x.to(torch.float32, copy=True)  # our own buffer: every op below may work in place
        if u[1] < p.jitter_p and self.jitter_ops:
            x = self._jitter(x, u[5:9], u[9:13])
        if self.rgb and u[2] < p.grayscale_p:
            x = _gray(x[None])[0]
        if u[3] < p.blur_p:
            x = _blur_image(x, p.blur_sigma[0] + (p.blur_sigma[1] - p.blur_sigma[0]) * u[13], self.kernel_size)
        if u[4] < p.solarize_p:
            x = torch.where(x >= p.solarize_threshold, 255 - x, x)
        return (x - self.mean).div_(self.std)

    def _jitter(self, x: Tensor, draws: list[float], keys: list[float]) -> Tensor:
        """torchvision's float ColorJitter on the 0..255 scale: blends clamped to the range, hue
        rotated in HSV; ``keys`` order the ops (sorting iid uniforms: a uniform permutation)."""
        for op in sorted(self.jitter_ops, key=keys.__getitem__):
            f = self.factor_lo[op] + (self.factor_hi[op] - self.factor_lo[op]) * draws[op]
            if op == 0:  # brightness: blend with black
                x.mul_(f).clamp_(0, 255)
            elif op == 1:  # contrast: blend with the mean luma (of the per-channel means: the same number)
                mean = (x.mean(dim=(1, 2)) * self.gray_weights).sum() if self.rgb else x.mean()
                x.mul_(f).add_(mean * (1 - f)).clamp_(0, 255)
            elif op == 2:  # saturation: blend with the luma
                gray = _gray(x[None])[0]
                x.mul_(f).add_(gray, alpha=1 - f).clamp_(0, 255)
            else:  # hue
                x = _adjust_hue(x[None], f)[0]
        return x


class TwoViewTransform:
    """PIL image (mode L, RGB, RGBA, P, ...) -> (view1, view2), float32 (C, S, S), normalised.

    ``num_channels`` 3 converts to RGB, 1 to L (then saturation, hue and grayscale are skipped).
    ``mean``/``std`` are the backbone's, on the [0, 1] scale, one value per channel. A uint8
    (C, H, W) tensor is taken as it is. See :class:`_CpuView` for how each view is made.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_channels: int = 3,
        interpolation: v2.InterpolationMode = BICUBIC,
        view_params: tuple[ViewAugmentationParams, ViewAugmentationParams] | None = None,
    ) -> None:
        _check_channels(num_channels, mean, std)
        self.num_channels = num_channels
        view_params = view_params or barlow_twins_view_params()
        self.view1, self.view2 = (
            _CpuView(p, image_size, num_channels, interpolation, mean, std) for p in view_params
        )

    def __call__(self, image: Image.Image | Tensor) -> tuple[Tensor, Tensor]:
        x = _to_uint8_tensor(image, self.num_channels)
        return self.view1(x), self.view2(x)


class TwoViewCropTransform:
    """PIL image -> (crop1, crop2), uint8 (C, S, S): RandomResizedCrop only.

    Everything else, flip included, runs batched on the device (:class:`TwoViewBatchAugmentation`),
    so the device module owns all per-pixel randomness and the CPU does one resize per view.
    """

    def __init__(
        self,
        image_size: int,
        num_channels: int = 3,
        interpolation: v2.InterpolationMode = BICUBIC,
        view_params: tuple[ViewAugmentationParams, ViewAugmentationParams] | None = None,
    ) -> None:
        _check_channels(num_channels, (0.0,) * num_channels, (1.0,) * num_channels)
        self.num_channels = num_channels
        view_params = view_params or barlow_twins_view_params()
        self.crop1, self.crop2 = (_crop(p, image_size, interpolation) for p in view_params)

    def __call__(self, image: Image.Image | Tensor) -> tuple[Tensor, Tensor]:
        x = _to_uint8_tensor(image, self.num_channels)
        return self.crop1(x), self.crop2(x)


# --------------------------------------------------------------------------- supervised training
class SupervisedTrainTransform:
    """PIL image (any mode) -> float32 (C, S, S): random resized crop, horizontal flip, normalise.

    The training transform of the linear and semi-supervised protocols and of fine-tuning
    (torchvision's ImageNet recipe, which the paper's evaluation uses). Evaluation uses the
    model's image processor instead (resize and centre crop).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_channels: int = 3,
        interpolation: v2.InterpolationMode = BICUBIC,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip_p: float = 0.5,
    ) -> None:
        _check_channels(num_channels, mean, std)
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be 0 < lo <= hi <= 1, got {crop_scale}")
        self.num_channels = num_channels
        self.pipeline = v2.Compose([
            v2.RandomResizedCrop(image_size, crop_scale, (3 / 4, 4 / 3), interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(flip_p),
            _ToNormalizedFloat(mean, std),
        ])

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        return self.pipeline(_to_uint8_tensor(image, self.num_channels))


def supervised_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_channels: int = 3,
    interpolation: v2.InterpolationMode | str = BICUBIC,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> SupervisedTrainTransform:
    """:class:`SupervisedTrainTransform` for a backbone's preprocessing (``interpolation`` may be
    a name: "bicubic", "bilinear" or "nearest")."""
    return SupervisedTrainTransform(
        image_size, mean, std, num_channels, v2.InterpolationMode(interpolation), crop_scale=crop_scale
    )
