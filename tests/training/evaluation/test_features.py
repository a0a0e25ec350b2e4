"""Tests for training.evaluation.features: feature extraction and the weighted kNN classifier.

The kNN is checked against scikit-learn's ``KNeighborsClassifier`` (cosine metric, weights
``exp((1 - d) / T)`` = ``exp(sim / T)``) and against scores worked out by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from training.evaluation.features import extract_features, knn_classify, knn_top1, knn_topk_accuracy


# ----------------------------------------------------------------------------- helpers


def clustered(num_classes: int = 6, per_class: int = 40, dim: int = 16, noise: float = 0.9, seed: int = 0):
    """Gaussian clusters that overlap enough for neighbours of several classes to vote.

    float64 so that sklearn and torch agree on neighbour order; continuous draws make exact
    distance ties (which the two could break differently) a probability-zero event.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    points = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    order = rng.permutation(labels.size)
    return points[order], labels[order]


def sklearn_knn(k: int, temperature: float) -> KNeighborsClassifier:
    return KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / temperature)
    )


class Pooler(nn.Module):
    """A tiny encoder with dropout and BatchNorm (both mode-dependent), returning `pooler_output`."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.plain = plain
        self.seen_training: list[bool] = []

    def forward(self, pixel_values: torch.Tensor):
        self.seen_training.append(self.training)
        out = self.net(pixel_values)
        return out if self.plain else SimpleNamespace(pooler_output=out)


def make_batches(sizes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(n, 3, 4, 4, generator=g),
            "labels": torch.randint(0, 3, (n,), generator=g, dtype=torch.int32),
        }
        for n in sizes
    ]


# ----------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("k", [1, 7, 20, 150])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_knn_matches_sklearn(k, temperature):
    x, y = clustered()
    train_x, train_y, test_x, test_y = x[:150], y[:150], x[150:], y[150:]
    reference = sklearn_knn(k, temperature).fit(train_x, train_y)

    train_t, train_labels_t = torch.from_numpy(train_x), torch.from_numpy(train_y)
    test_t, test_labels_t = torch.from_numpy(test_x), torch.from_numpy(test_y)
    scores = knn_classify(train_t, train_labels_t, test_t, 6, k, temperature)
    assert scores.shape == (test_x.shape[0], 6) and scores.dtype == torch.float64
    predicted = scores.argmax(1).numpy()
    np.testing.assert_array_equal(predicted, reference.predict(test_x))

    # The scores themselves, rebuilt from sklearn's neighbour lists and cosine distances.
    distances, indices = reference.kneighbors(test_x)
    expected = np.zeros((test_x.shape[0], 6))
    for q in range(test_x.shape[0]):
        for d, i in zip(distances[q], indices[q]):
            expected[q, train_y[i]] += math.exp((1 - d) / temperature)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9)

    # Not a vacuous comparison: with k > 1 the clusters overlap, so votes are mixed.
    if k > 1:
        assert ((scores > 0).sum(1) > 1).any()
    accuracy = knn_top1(train_t, train_labels_t, test_t, test_labels_t, k=k, temperature=temperature)
    assert accuracy == pytest.approx(reference.score(test_x, test_y))


def test_knn_chunking_and_float32_agree():
    x, y = clustered(seed=1)
    train_x, train_y, test_x = torch.from_numpy(x[:200]), torch.from_numpy(y[:200]), torch.from_numpy(x[200:])
    whole = knn_classify(train_x, train_y, test_x, 6, k=20)
    chunked = knn_classify(train_x, train_y, test_x, 6, k=20, chunk_size=7)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)  # matmul blocking differs
    single = knn_classify(train_x.float(), train_y, test_x.float(), 6, k=20)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), whole, rtol=1e-4, atol=1e-6)


def test_knn_by_hand():
    # Normalised: (1, 0) class 0, (0, 1) class 1, (1, 1)/sqrt(2) class 1. Query (2, 0) -> (1, 0),
    # so its cosine similarities are 1, 0 and 1/sqrt(2).
    train = torch.tensor([[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    t = 0.5
    r = 1 / math.sqrt(2)

    scores = knn_classify(train, labels, query, num_classes=3, k=2, temperature=t)
    # Query 2 = (0, -1): similarities 0, -1, -1/sqrt(2); its two nearest are points 0 and 2.
    expected = torch.tensor(
        [[math.exp(1 / t), math.exp(r / t), 0.0], [math.exp(0 / t), math.exp(-r / t), 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(scores, expected)

    all_three = knn_classify(train, labels, query, num_classes=3, k=3, temperature=t)
    expected_all = torch.tensor(
        [
            [math.exp(1 / t), math.exp(0 / t) + math.exp(r / t), 0.0],
            [math.exp(0 / t), math.exp(-1 / t) + math.exp(-r / t), 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(all_three, expected_all)
    # k beyond the training set is clamped to it.
    torch.testing.assert_close(knn_classify(train, labels, query, num_classes=3, k=1000, temperature=t), expected_all)

    # At k=2 both queries go to class 0 (e^2 > e^1.41 and e^0 > e^-1.41): one right, one wrong.
    assert knn_top1(train, labels, query, torch.tensor([0, 1]), num_classes=3, k=2, temperature=t) == 0.5


def test_topk_accuracy():
    x, y = clustered(num_classes=8, per_class=30, noise=1.5, seed=2)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    train_x, train_y, test_x, test_y = tx[:180], ty[:180], tx[180:], ty[180:]
    result = knn_topk_accuracy(train_x, train_y, test_x, test_y, k=15)
    assert set(result) == {"top1", "top5"}

    scores = knn_classify(train_x, train_y, test_x, 8, k=15)
    ranked = scores.argsort(1, descending=True)  # independent of topk
    assert result["top1"] == pytest.approx((ranked[:, 0] == test_y).double().mean().item())
    assert result["top5"] == pytest.approx((ranked[:, :5] == test_y[:, None]).any(1).double().mean().item())
    assert 0 < result["top1"] < result["top5"] <= 1  # overlapping clusters: both informative
    assert result["top1"] == knn_top1(train_x, train_y, test_x, test_y, k=15)

    # Fewer than five classes: no top-5.
    few = knn_topk_accuracy(train_x[train_y < 4], train_y[train_y < 4], test_x[test_y < 4], test_y[test_y < 4])
    assert set(few) == {"top1"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_classes": 2}, "train_labels must lie"),
        ({"query_features": torch.randn(3, 5)}, "widths differ"),
        ({"train_labels": torch.zeros(9, dtype=torch.long)}, "train_labels must have shape"),
        ({"train_features": torch.randn(0, 4), "train_labels": torch.zeros(0, dtype=torch.long)}, "empty"),
        ({"query_features": torch.randn(4)}, "2-D"),
    ],
)
def test_knn_bad_args(kwargs, match):
    args = {
        "train_features": torch.randn(10, 4),
        "train_labels": torch.arange(10) % 3,
        "query_features": torch.randn(3, 4),
        "num_classes": 3,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        knn_classify(**args)


def test_knn_top1_bad_test_set():
    train, labels = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(ValueError, match="non-empty"):
        knn_top1(train, labels, torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="test_labels must have shape"):
        knn_top1(train, labels, torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="test_labels must lie"):
        knn_top1(train, labels, torch.randn(2, 4), torch.tensor([0, 3]), num_classes=3)


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("training", [True, False])
def test_extract_features_restores_mode_and_runs_in_eval(training):
    encoder = Pooler().train(training)
    batches = make_batches([4, 0, 3])
    features, labels = extract_features(encoder, batches)

    assert encoder.training is training
    assert all(m.training is training for m in encoder.modules())
    assert encoder.seen_training == [False, False]  # two forwards: the empty batch was skipped
    assert features.shape == (7, 8) and features.dtype == torch.float32 and features.device.type == "cpu"
    assert labels.shape == (7,) and labels.dtype == torch.long
    torch.testing.assert_close(labels, torch.cat([b["labels"] for b in batches]).long())
    # Eval mode: deterministic dropout and BatchNorm running statistics.
    expected = encoder.eval().net(torch.cat([b["pixel_values"] for b in batches]))
    torch.testing.assert_close(features, expected)


def test_extract_features_keeps_mixed_modes():
    encoder = Pooler().train()
    encoder.net[2].eval()  # a deliberately frozen BatchNorm inside a training model
    extract_features(encoder, make_batches([2]))
    assert encoder.training and encoder.net[1].training and encoder.net[3].training
    assert not encoder.net[2].training


def test_extract_features_restores_mode_on_error():
    encoder = Pooler().train()
    with pytest.raises(KeyError):
        extract_features(encoder, [{"labels": torch.zeros(2)}])
    assert all(m.training for m in encoder.modules())


def test_extract_features_options():
    encoder = Pooler(plain=True)  # returns a bare tensor
    batches = make_batches([4, 3, 5])
    features, labels = extract_features(encoder, batches, device="cpu", max_batches=2, progress=True)
    assert features.shape == (7, 8) and labels.shape == (7,)

    empty_f, empty_l = extract_features(encoder, batches, max_batches=0)
    assert empty_f.shape == (0, 0) and empty_l.shape == (0,) and empty_l.dtype == torch.long
    with pytest.raises(ValueError, match="max_batches"):
        extract_features(encoder, batches, max_batches=-1)


def test_extract_features_barlow_twins_model(tiny_config):
    from modeling_barlow import BarlowTwinsModel

    model = BarlowTwinsModel(tiny_config).train()
    batches = make_batches([2, 3])
    for b in batches:
        b["pixel_values"] = torch.randn(b["pixel_values"].shape[0], 3, 32, 32)
    features, labels = extract_features(model, batches)
    assert model.training
    assert features.shape == (5, model.num_features) and labels.shape == (5,)
    expected = model.eval()(pixel_values=torch.cat([b["pixel_values"] for b in batches])).pooler_output
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_linear_probe_separates_separable_classes_and_not_shuffled_ones():
    from training.shared.metrics import topk_accuracy
    from training.evaluation.probes import exact_linear_probe

    def top1(x, y):
        return topk_accuracy(exact_linear_probe(x[:300], y[:300], x[300:], 4), y[300:])["top1"]

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 5
    labels = torch.arange(400) % 4
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    assert top1(features, labels) == 1.0
    shuffled = labels[torch.randperm(400, generator=generator)]
    assert top1(features, shuffled) < 0.45


def test_progress_bar_over_a_stream_without_length():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for label in range(3):
                yield {"pixel_values": torch.randn(4), "labels": label}

    class Identity(torch.nn.Module):
        def forward(self, pixel_values):
            return pixel_values

    loader = torch.utils.data.DataLoader(Stream(), batch_size=2)
    features, labels = extract_features(Identity(), loader, progress=True)
    assert features.shape == (3, 4) and labels.tolist() == [0, 1, 2]
