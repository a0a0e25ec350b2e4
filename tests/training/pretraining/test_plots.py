"""Tests for training.pretraining.plots: the cross-correlation heat map and its summary numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_barlow import cross_correlation
from training.pretraining.plots import _title, plot_cross_correlation, summarise_cross_correlation


def numpy_summary(matrix: np.ndarray) -> tuple[float, float]:
    """Diagonal mean and off-diagonal |C| mean, with an explicit mask (the independent way)."""
    off = ~np.eye(matrix.shape[0], dtype=bool)
    return float(np.diag(matrix).mean()), float(np.abs(matrix[off]).mean())


def test_summary_identity_and_random():
    assert summarise_cross_correlation(torch.eye(32)) == {"diagonal_mean": 1.0, "off_diagonal_abs_mean": 0.0}

    z1, z2 = torch.randn(64, 48), torch.randn(64, 48)
    c = cross_correlation(z1, z2)
    summary = summarise_cross_correlation(c)
    diag, off = numpy_summary(c.double().numpy())
    assert summary["diagonal_mean"] == pytest.approx(diag, rel=1e-5, abs=1e-7)
    assert summary["off_diagonal_abs_mean"] == pytest.approx(off, rel=1e-5)
    assert 0.05 < off < 0.3  # independent views: small but non-zero correlations

    # Perfectly correlated views: C is the identity up to the standardisation's eps.
    same = summarise_cross_correlation(cross_correlation(z1, z1))
    assert same["diagonal_mean"] == pytest.approx(1.0, abs=1e-3)

    assert math.isnan(summarise_cross_correlation(torch.ones(1, 1))["off_diagonal_abs_mean"])
    with pytest.raises(ValueError, match="square"):
        summarise_cross_correlation(torch.zeros(3, 4))


@pytest.mark.parametrize("kind", ["identity", "random"])
def test_plot_writes_png(tmp_path, kind):
    d = 40
    matrix = torch.eye(d) if kind == "identity" else torch.empty(d, d).uniform_(-1, 1).requires_grad_()
    path = plot_cross_correlation(matrix, tmp_path / "nested" / "dir" / "c.png", max_dims=16, title="step 10")

    assert path == tmp_path / "nested" / "dir" / "c.png" and path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_title_uses_whole_matrix():
    # A corner that looks perfect, in a matrix that is not: the title must describe the matrix.
    matrix = torch.full((64, 64), 0.5)
    matrix[:8, :8] = torch.eye(8)
    diag, off = numpy_summary(matrix.numpy())
    text = _title(64, summarise_cross_correlation(matrix), "run A")
    assert text.startswith("run A\n")
    assert "D = 64" in text and f"{diag:.3f}" in text and f"{off:.3f}" in text
    assert diag == pytest.approx((8 * 1.0 + 56 * 0.5) / 64)  # not the corner's 1.0


def test_plot_bad_args(tmp_path):
    with pytest.raises(ValueError, match="max_dims"):
        plot_cross_correlation(torch.eye(4), tmp_path / "a.png", max_dims=0)
    with pytest.raises(ValueError, match="square"):
        plot_cross_correlation(torch.zeros(4, 5), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
