"""Device path: batched per-sample augmentation of uint8 crops on the accelerator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .ops import _adjust_hue, _blur, _gray
from .params import ViewAugmentationParams, _check_channels, barlow_twins_view_params


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
