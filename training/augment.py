"""Barlow Twins two-view augmentation (the BYOL recipe): the one home of the paper's parameters.

Two interchangeable implementations draw from the same distributions:

* CPU path (:class:`TwoViewTransform`), for DataLoader workers: PIL image -> two normalised float
  views. Per view: torchvision's random-resized crop on uint8, then one conversion to float32 and
  flip, colour jitter, grayscale, blur, solarisation and normalisation in place on the crop
  (:class:`_CpuView`), written for one thread: few, cheap tensor ops and no per-op dispatch.
* Device path: :class:`TwoViewCropTransform` only crops on the CPU (uint8 out), then
  :class:`TwoViewBatchAugmentation` / :class:`BatchedViewAugmentation` do flip, colour, blur,
  solarise and normalisation on whole batches (CPU or CUDA), with per-sample random parameters.

Both paths work in float32 after the crop, with no rounding between ops, and share the colour
and blur formulas (torchvision's float ops); the distributions are identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

__all__ = [
    "ViewAugmentationParams",
    "BARLOW_TWINS_VIEW1",
    "BARLOW_TWINS_VIEW2",
    "barlow_twins_view_params",
    "TwoViewTransform",
    "TwoViewCropTransform",
    "AugmentationDraw",
    "BatchedViewAugmentation",
    "TwoViewBatchAugmentation",
]

BICUBIC = v2.InterpolationMode.BICUBIC
# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_TINY = torch.finfo(torch.float32).tiny
# (h6 + offset) mod 6 - 3 is the signed hue distance to the red, green and blue peaks.
_HUE_OFFSETS = torch.tensor([0.0, 4.0, 2.0]).view(1, 3, 1, 1)


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


# --------------------------------------------------------------------------- shared kernels
def _gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(B,) sigmas -> (B, kernel_size) normalised 1-D Gaussians, sampled like torchvision's."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def _blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample Gaussian blur of float (B, C, H, W) with sigma (B,); reflect padding as torchvision.

    Separable (2 x k taps instead of k^2) and batched as one grouped conv over B*C channels.
    """
    b, c, h, w = x.shape
    k = _gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, b * c, h + 2 * pad, w + 2 * pad)
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def _gray(x: Tensor) -> Tensor:
    """RGB float (B, 3, H, W) -> luma (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _adjust_hue(x: Tensor, shift: Tensor | float) -> Tensor:
    """Rotate the hue of RGB float (B, 3, H, W) by per-sample ``shift`` (B,) turns (or one float).

    Any value scale works (0..1 or 0..255): the result is a per-pixel mix of its max and min.
    Written for one CPU thread: ``amax``/``amin`` and floor-based wrapping instead of ``aminmax``
    and ``%`` (each several times slower there), one broadcast pass for the three channels.
    """
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    # Hue in sixths of a turn, as in torchvision's _rgb_to_hsv (grey pixels get 0 and stay grey).
    num = torch.where(
        maxc == r, g - b, torch.where(maxc == g, (b - r).add_(delta, alpha=2), (r - g).add_(delta, alpha=4))
    )
    h6 = num.div_(delta.clamp(min=_TINY)).add_(6 * shift.view(-1, 1, 1) if isinstance(shift, Tensor) else 6 * shift)
    # Closed-form HSV -> RGB: c_n = v - v*s*f_n, v*s = delta, f_n = clamp(2 - d_n, 0, 1), where d_n is
    # the distance on the hue circle (circumference 6) from h6 to channel n's peak (0 red, 2 green, 4 blue).
    t = h6.unsqueeze(1) + _HUE_OFFSETS.to(x.device, x.dtype)
    d = t.sub_(t.div(6).floor_().mul_(6)).sub_(3).abs_()
    return torch.addcmul(maxc.unsqueeze(1), delta.unsqueeze(1), d.neg_().add_(2).clamp_(0, 1), value=-1)


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


def _check_channels(num_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if num_channels not in (1, 3) or len(mean) != num_channels or len(std) != num_channels:
        raise ValueError(f"need num_channels 1 or 3 and that many mean/std values: {num_channels}, {mean}, {std}")


# --------------------------------------------------------------------------- device path
@dataclass(frozen=True)
class AugmentationDraw:
    """Per-sample random parameters of one view for a batch of B images."""

    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool
    jitter_order: Tensor  # (B, 4) long, a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue
    jitter_factors: Tensor  # (B, 4) float: brightness, contrast, saturation factors, hue shift
    grayscale: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) float
    solarize: Tensor  # (B,) bool

    def to(self, device: torch.device | str) -> AugmentationDraw:
        return AugmentationDraw(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _bcast(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


class BatchedViewAugmentation(nn.Module):
    """One view's augmentation on a batch: uint8 (B, C, H, W) -> normalised float32 (B, C, H, W).

    Every op is decided per sample by a Bernoulli mask, with per-sample factors, and no Python loop
    over samples. ``gather_subsets`` chooses how a masked op runs: True computes it only on the
    selected samples (boolean indexing: least work, but a host sync on CUDA); False computes it on
    the whole batch and selects with ``torch.where`` (sync-free). None (default): True on CPU, False
    elsewhere. Both give the same result. The blur kernel side follows
    :meth:`ViewAugmentationParams.blur_kernel_size` of the input's side.
    """

    def __init__(
        self,
        params: ViewAugmentationParams,
        mean: Sequence[float],
        std: Sequence[float],
        gather_subsets: bool | None = None,
    ) -> None:
        super().__init__()
        _check_channels(len(mean), mean, std)
        self.params = params
        self.gather_subsets = gather_subsets
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def sample(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> AugmentationDraw:
        """Draw the per-sample parameters (on ``generator``'s device, then moved to ``device``)."""
        p = self.params
        gen_device = generator.device if generator is not None else torch.device(device or "cpu")

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=gen_device)

        coins = rand(batch_size, 5)
        lo = torch.tensor([max(0.0, 1 - p.brightness), max(0.0, 1 - p.contrast), max(0.0, 1 - p.saturation), -p.hue])
        hi = torch.tensor([1 + p.brightness, 1 + p.contrast, 1 + p.saturation, p.hue])
        factors = lo.to(gen_device) + (hi - lo).to(gen_device) * rand(batch_size, 4)
        order = rand(batch_size, 4).argsort(dim=1)  # argsort of iid uniforms: a uniform permutation
        sigma = p.blur_sigma[0] + (p.blur_sigma[1] - p.blur_sigma[0]) * rand(batch_size)
        draw = AugmentationDraw(
            flip=coins[:, 0] < p.flip_p,
            jitter=coins[:, 1] < p.jitter_p,
            jitter_order=order,
            jitter_factors=factors,
            grayscale=coins[:, 2] < p.grayscale_p,
            blur=coins[:, 3] < p.blur_p,
            sigma=sigma,
            solarize=coins[:, 4] < p.solarize_p,
        )
        return draw if device is None else draw.to(device)

    def _masked(self, mask: Tensor, fn: Callable[..., Tensor], x: Tensor, *per_sample: Tensor) -> Tensor:
        """x (B, C, H, W) with fn(x, *per_sample) on the samples where mask (B,) is True."""
        subsets = self.gather_subsets if self.gather_subsets is not None else x.device.type == "cpu"
        if not subsets:
            return torch.where(_bcast(mask), fn(x, *per_sample), x)
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == x.shape[0]:
            return fn(x, *per_sample)
        if idx.numel() > 0:
            x[idx] = fn(x[idx], *(a[idx] for a in per_sample))  # x is always our own float copy
        return x

    @torch.no_grad()
    def apply(self, images: Tensor, draw: AugmentationDraw) -> Tensor:
        """Apply a given draw to uint8 (B, C, H, W); returns normalised float32 (B, C, H, W)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.mean.shape[1]:
            expected = f"uint8 (B, {self.mean.shape[1]}, H, W)"
            raise ValueError(f"expected {expected}, got {images.dtype} {tuple(images.shape)}")
        p = self.params
        kernel_size = p.blur_kernel_size(min(images.shape[-2:]))
        # On u/255 data, x >= 128/255 selects exactly the uint8 pixels >= 128 (both rounded alike).
        threshold = p.solarize_threshold / 255
        x = images.to(torch.float32).div_(255)
        x = self._masked(draw.flip, lambda t: t.flip(-1), x)
        x = self._jitter(x, draw)
        if x.shape[1] == 3:
            x = self._masked(draw.grayscale, lambda t: _gray(t).repeat(1, 3, 1, 1), x)
        x = self._masked(draw.blur, lambda t, s: _blur(t, s, kernel_size), x, draw.sigma)
        x = self._masked(draw.solarize, lambda t: torch.where(t >= threshold, 1 - t, t), x)
        return (x - self.mean) / self.std

    def _jitter(self, x: Tensor, draw: AugmentationDraw) -> Tensor:
        """ColorJitter with a per-sample op order: at each of the 4 positions every sample runs
        its own op. Brightness, contrast and saturation are all blends x*f + t*(1-f) with target
        t = 0, mean luma or luma, so one blend per position covers them (f = 1 is an exact no-op).
        On one channel the luma is the image, so saturation is a no-op there, and hue is skipped."""
        rgb = x.shape[1] == 3
        for position in range(4):
            op = draw.jitter_order[:, position]
            f = draw.jitter_factors[:, :3].gather(1, op.clamp(max=2)[:, None])[:, 0]
            f = _bcast(torch.where(draw.jitter & (op < 3), f, 1.0))
            gray = _gray(x) if rgb else x
            target = torch.where(
                _bcast(op == 0), 0.0, torch.where(_bcast(op == 1), gray.mean(dim=(1, 2, 3), keepdim=True), gray)
            )
            x = (x * f + target * (1 - f)).clamp_(0, 1)
            if rgb:
                x = self._masked(draw.jitter & (op == 3), _adjust_hue, x, draw.jitter_factors[:, 3])
        return x

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, C, H, W) on any device -> normalised float32 (B, C, H, W), fresh random draw."""
        return self.apply(images, self.sample(images.shape[0], images.device, generator))


class TwoViewBatchAugmentation(nn.Module):
    """Applies the view-1 and view-2 modules to a pair of uint8 (B, C, H, W) batches."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        view_params: tuple[ViewAugmentationParams, ViewAugmentationParams] | None = None,
        gather_subsets: bool | None = None,
    ) -> None:
        super().__init__()
        params1, params2 = view_params or barlow_twins_view_params()
        self.view1 = BatchedViewAugmentation(params1, mean, std, gather_subsets)
        self.view2 = BatchedViewAugmentation(params2, mean, std, gather_subsets)

    def forward(
        self, images1: Tensor, images2: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) uint8 x 2 -> (B, C, H, W) float32 x 2."""
        return self.view1(images1, generator), self.view2(images2, generator)


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


__all__ += ["SupervisedTrainTransform", "supervised_train_transform"]
