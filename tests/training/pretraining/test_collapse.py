"""RankMe, the collapse monitor: against the paper's formula computed with numpy, on inputs whose
effective rank is known in closed form, and as the trainer's monitor (values and warning)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining
from tests.conftest import TINY_RESNET
from training.pretraining.collapse import RankMeMonitor, rankme


def numpy_rankme(matrix: np.ndarray, epsilon: float = 1e-7) -> float:
    """Garrido et al. (2023), eq. 1, written out independently: numpy's SVD, natural logarithm."""
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    p = sigma / np.abs(sigma).sum() + epsilon
    return float(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.parametrize("shape", [(256, 64), (32, 128), (100, 100)])
def test_matches_the_papers_formula(shape):
    embeddings = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, shape[1])
    assert rankme(embeddings) == pytest.approx(numpy_rankme(embeddings.numpy()), rel=1e-9)
    assert rankme(embeddings.to(torch.bfloat16)) == pytest.approx(numpy_rankme(embeddings.to(torch.bfloat16).float().numpy()), rel=1e-6)


def _equal_values(rank: int, num_values: int, epsilon: float = 1e-7) -> float:
    # `rank` equal non-zero singular values among min(N, D) = num_values, in closed form:
    # p = (1/rank + eps) for those, eps for the others. That is `rank`, but for the paper's eps.
    p = np.array([1 / rank + epsilon] * rank + [epsilon] * (num_values - rank))
    return float(np.exp(-np.sum(p * np.log(p))))


def _rank_one_value(num_values: int) -> float:
    return _equal_values(1, num_values)


def test_collapsed_embeddings_have_rank_one():
    assert _rank_one_value(64) == pytest.approx(1.0001, abs=1e-5)  # 1, but for the paper's epsilon
    # Every image mapped to the same vector: one non-zero singular value.
    same = torch.randn(1, 64, dtype=torch.float64).repeat(128, 1)
    assert rankme(same) == pytest.approx(_rank_one_value(64), abs=1e-6)
    # Collapse onto a line (different lengths, one direction) is just as complete.
    line = torch.randn(128, 1, dtype=torch.float64) * torch.randn(1, 64, dtype=torch.float64)
    assert rankme(line) == pytest.approx(_rank_one_value(64), abs=1e-6)
    # No direction at all: every p_k is epsilon.
    assert rankme(torch.zeros(16, 8)) == pytest.approx(np.exp(-8 * 1e-7 * np.log(1e-7)), abs=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 17, 64])
def test_k_equal_singular_values_give_rank_k(rank):
    # Orthonormal columns times one scale: k singular values all equal, so p_k = 1/k and RankMe = k.
    q, _ = torch.linalg.qr(torch.randn(200, 64, dtype=torch.float64))
    embeddings = 5.0 * q[:, :rank] @ torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0][:rank]
    assert rankme(embeddings) == pytest.approx(_equal_values(rank, 64), rel=1e-9)
    assert _equal_values(rank, 64) == pytest.approx(rank, rel=2e-4)


def test_invariant_to_scale_and_rotation():
    x = torch.randn(64, 32, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    assert rankme(3.7 * x @ rotation) == pytest.approx(rankme(x), rel=1e-9)


def test_rejects_what_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rankme(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rankme(torch.randn(0, 3))


DIGITS = SimpleNamespace(dataset_name=None, train_dir=None, dataset_config_name=None, cache_dir=None, train_split="train")


def _monitor(config: BarlowTwinsConfig, threshold: float) -> RankMeMonitor:
    monitor = RankMeMonitor.create(DIGITS, "image", config, Accelerator(cpu=True), num_samples=48, threshold=threshold)
    assert monitor is not None and monitor.source == "held-out"  # the digits' test split
    assert monitor.pixel_values.shape == (48, 3, 32, 32)
    return monitor


def test_monitor_measures_the_encoder_and_the_projector():
    config = BarlowTwinsConfig(**TINY_RESNET, image_size=32)
    model = BarlowTwinsForPreTraining(config).train()
    monitor = _monitor(config, threshold=0.0)
    values = monitor.measure(model, step=5)
    assert model.training  # back in training mode afterwards
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=monitor.pixel_values)
    assert values["rankme"] == pytest.approx(numpy_rankme(out.pooler_output.numpy()), rel=1e-5)
    assert values["rankme_projections"] == pytest.approx(numpy_rankme(out.projections.numpy()), rel=1e-5)


def _collapse(model: BarlowTwinsForPreTraining) -> None:
    # The last stage's output no longer depends on the image, so every image gets the same
    # features after its ReLU and pooling.
    with torch.no_grad():
        for parameter in model.barlow_twins.backbone.layer4.parameters():
            parameter.zero_()
        model.barlow_twins.backbone.layer4[-1].bn2.bias.fill_(1.0)


def test_monitor_warns_when_the_encoder_collapses(caplog):
    config = BarlowTwinsConfig(**TINY_RESNET, image_size=32)
    model = BarlowTwinsForPreTraining(config)
    with caplog.at_level(logging.WARNING, logger="training.pretraining.collapse"):
        first = _monitor(config, threshold=0.0).measure(model, step=1)["rankme"]
        # A threshold between the new model's value and complete collapse's 1 (a new ResNet's
        # ReLU features are dominated by their mean: ~1.7 here): no warning; after the collapse, one.
        assert first > 1.2
        monitor = _monitor(config, threshold=(1 + first) / 2)
        assert monitor.measure(model, step=1)["rankme"] == pytest.approx(first) and not caplog.records
        _collapse(model)
        assert monitor.measure(model, step=2)["rankme"] == pytest.approx(1.0, abs=1e-3)  # float32: ~1e-4 of noise
        monitor.measure(model, step=3)  # still collapsed: said once
        monitor.measure(model, step=4, last=True)
    assert [r.getMessage()[:40] for r in caplog.records] == ["step 2: the encoder's RankMe fell to 1.0"]


def test_monitor_accepts_a_start_below_the_threshold_but_not_an_end(caplog):
    # A new network's features are dominated by their mean; starting low is no collapse. Ending low is.
    config = BarlowTwinsConfig(**TINY_RESNET, image_size=32)
    model = BarlowTwinsForPreTraining(config)
    monitor = _monitor(config, threshold=1000.0)
    with caplog.at_level(logging.WARNING, logger="training.pretraining.collapse"):
        monitor.measure(model, step=1)
        monitor.measure(model, step=2)
        assert not caplog.records
        monitor.measure(model, step=3, last=True)
    assert len(caplog.records) == 1 and "step 3: the encoder's RankMe ended" in caplog.records[0].getMessage()
