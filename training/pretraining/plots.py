"""Pictures of the Barlow Twins cross-correlation matrix.

The objective drives C (from :func:`modeling_barlow.cross_correlation`) towards the identity;
a heat map of a corner of C shows at a glance how far training has got (a bright diagonal on a
neutral background), and the two summary numbers track the same thing in logs.

matplotlib is imported only when a plot is drawn, so training without plots does not need it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = ["plot_cross_correlation", "summarise_cross_correlation"]


def _check_square(matrix: torch.Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"expected a non-empty square (D, D) matrix, got shape {tuple(matrix.shape)}")


@torch.no_grad()
def summarise_cross_correlation(matrix: torch.Tensor) -> dict[str, float]:
    """Distance of a cross-correlation matrix from the identity, in two numbers.

    Args:
        matrix: (D, D), e.g. from :func:`modeling_barlow.cross_correlation`; any device.

    Returns:
        ``{"diagonal_mean": mean_i C_ii, "off_diagonal_abs_mean": mean_{i != j} |C_ij|}``; 1 and 0
        for the identity. ``off_diagonal_abs_mean`` is NaN when D = 1 (there is no off-diagonal).
    """
    _check_square(matrix)
    d = matrix.shape[0]
    m = matrix.detach().float()
    diagonal = torch.diagonal(m)
    # Whole-matrix |C| sum minus the diagonal's: reductions only, no D x D boolean mask, which
    # matters for D = 8192 (64M entries) on the GPU.
    total_abs = torch.linalg.vector_norm(m, ord=1).item()
    diagonal_abs = diagonal.abs().sum().item()
    off = (total_abs - diagonal_abs) / (d * d - d) if d > 1 else math.nan
    return {"diagonal_mean": diagonal.mean().item(), "off_diagonal_abs_mean": off}


def _title(d: int, summary: dict[str, float], title: str | None) -> str:
    stats = (
        f"D = {d}, mean diag = {summary['diagonal_mean']:.3f}, "
        f"mean |off-diag| = {summary['off_diagonal_abs_mean']:.3f}"
    )
    return f"{title}\n{stats}" if title else f"Cross-correlation C\n{stats}"


def plot_cross_correlation(
    matrix: torch.Tensor,
    path: str | os.PathLike,
    max_dims: int = 128,
    title: str | None = None,
) -> Path:
    """Save a heat map of the top-left ``max_dims x max_dims`` block of C as a PNG.

    Args:
        matrix: (D, D) cross-correlation, from :func:`modeling_barlow.cross_correlation`; any
            device, gradients ignored.
        path: output file; parent directories are created.
        max_dims: size of the plotted corner (the whole matrix when D <= max_dims); a few
            hundred pixels per side is what a heat map can show anyway.
        title: optional first title line; the second line always gives D, the diagonal mean and
            the mean |off-diagonal| of the WHOLE matrix (see :func:`summarise_cross_correlation`).

    Returns:
        ``Path(path)``.

    The colour scale is fixed to [-1, 1] on a diverging map so that plots from different steps
    or runs compare directly: the identity is a red diagonal on white.
    """
    if max_dims < 1:
        raise ValueError(f"max_dims must be >= 1, got {max_dims}")
    _check_square(matrix)
    try:
        # The object API with an explicit Agg canvas, not pyplot: no global backend switch and no
        # figure registry, so it is safe from notebooks, threads and headless training jobs.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plot_cross_correlation needs matplotlib: pip install matplotlib") from error

    d = matrix.shape[0]
    summary = summarise_cross_correlation(matrix)
    # Only the plotted corner leaves the device.
    block = matrix.detach()[:max_dims, :max_dims].float().cpu().numpy()
    n = block.shape[0]

    figure = Figure(figsize=(6.4, 5.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(block, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="$C_{ij}$")
    shown = f" (first {n} of {d})" if n < d else ""
    axes.set_xlabel(f"dimension j of view 2{shown}")
    axes.set_ylabel(f"dimension i of view 1{shown}")
    axes.set_title(_title(d, summary, title), fontsize=10)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
