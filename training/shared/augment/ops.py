"""Float image ops shared by the CPU and device paths (torchvision's formulas, batched)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_TINY = torch.finfo(torch.float32).tiny
# (h6 + offset) mod 6 - 3 is the signed hue distance to the red, green and blue peaks.
_HUE_OFFSETS = torch.tensor([0.0, 4.0, 2.0]).view(1, 3, 1, 1)


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
