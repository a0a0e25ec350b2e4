"""Feature extraction and the weighted kNN classifier used to monitor representations.

Shared by the trainer's kNN monitor and the evaluation CLI so that both report the same number.

The kNN protocol is the common one for self-supervised models (Wu et al., 2018, "InstDisc"; used
by solo-learn and lightly): features are L2-normalised, similarity is the cosine, the ``k``
nearest training points vote for their own label with weight ``exp(sim / temperature)``, and
the class with the largest summed vote wins. Usual settings are ``k = 200`` and
``temperature = 0.1``; ``k = 20`` for small datasets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..shared.metrics import topk_accuracy

__all__ = ["extract_features", "knn_classify", "knn_top1", "knn_topk_accuracy"]


# ----------------------------------------------------------------------------- extraction


def _pooled(output: Any) -> torch.Tensor:
    """The (B, F) features of one encoder output: ``.pooler_output`` or a plain tensor."""
    if isinstance(output, torch.Tensor):
        features = output
    else:
        features = getattr(output, "pooler_output", None)
        if features is None and isinstance(output, Mapping):
            features = output.get("pooler_output")
        if not isinstance(features, torch.Tensor):
            raise TypeError(
                "encoder output must be a tensor or have a tensor `pooler_output`, "
                f"got {type(output).__name__}"
            )
    # Some backbones keep singleton spatial dims, e.g. (B, F, 1, 1); the kNN needs rows.
    return features.flatten(1) if features.ndim > 2 else features


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` in eval mode over ``batches`` and collect pooled features and labels.

    Args:
        encoder: called as ``encoder(pixel_values=...)``; returns an object with
            ``pooler_output`` of shape (B, F) (e.g. ``BarlowTwinsModel``) or a (B, F) tensor.
            Outputs with trailing singleton dims, e.g. (B, F, 1, 1), are flattened to (B, F).
        batches: iterable of mappings with ``"pixel_values"`` (B, C, H, W) and ``"labels"`` (B,),
            e.g. a ``DataLoader``. Batches with B = 0 are skipped.
        device: where the forward pass runs; the encoder must already be there.
        max_batches: stop after this many batches have been taken from ``batches`` (empty
            ones included), so that a monitor can bound its cost; ``None`` for all.
        progress: show a tqdm progress bar.

    Returns:
        ``(features, labels)``: float32 (N, F) and int64 (N,), both on CPU. With no samples,
        (0, 0) and (0,).

    The training flag of every submodule is restored afterwards, not just the top-level one, so
    a model in training mode with deliberately frozen (eval) BatchNorm layers comes back as is.
    """
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
    device = torch.device(device)

    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        iterator: Iterable = batches
        if progress:
            from tqdm.auto import tqdm

            total = max_batches
            if total is None:
                try:
                    total = len(batches)  # type: ignore[arg-type]
                except TypeError:  # a DataLoader over a stream has __len__ but no length
                    total = None
            iterator = tqdm(batches, total=total, desc="features", leave=False)
        for index, batch in enumerate(iterator):
            if max_batches is not None and index >= max_batches:
                break
            pixel_values = batch["pixel_values"]
            if pixel_values.shape[0] == 0:
                continue
            output = _pooled(encoder(pixel_values=pixel_values.to(device, non_blocking=True)))
            batch_labels = torch.as_tensor(batch["labels"])
            if output.shape[0] != batch_labels.shape[0]:
                raise ValueError(
                    f"encoder returned {output.shape[0]} rows for a batch with {batch_labels.shape[0]} labels"
                )
            features.append(output.float().cpu())
            labels.append(batch_labels.long().cpu())
    finally:
        # Restore even when the loader or the forward pass raises, or a training loop that
        # catches the error would carry on with dropout and BatchNorm updates switched off.
        for module, mode in modes:
            module.training = mode

    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


# ----------------------------------------------------------------------------- kNN


def _check_knn_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (N, F); got train {tuple(train_features.shape)}, "
            f"query {tuple(query_features.shape)}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("the training set is empty")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"feature widths differ: train {train_features.shape[1]}, query {query_features.shape[1]}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}), got [{train_labels.min()}, {train_labels.max()}]"
        )


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted-kNN class scores for each query.

    ``scores[q, c] = sum over the k training points i most cosine-similar to q with label c of
    exp(sim(q, i) / temperature)``.

    Args:
        train_features: (N, F) training features (not necessarily normalised).
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        query_features: (Q, F) features to classify.
        num_classes: C, the width of the result.
        k: neighbours per query; clamped to N.
        temperature: > 0. Very small values overflow to ``inf`` (in float32 below about 0.0114,
            since ``sim`` reaches 1); pass float64 features if you need them.
        chunk_size: queries per similarity block, bounding memory at ``chunk_size x N``.

    Returns:
        (Q, C) scores, on ``train_features``' device, in float32 (float64 when both feature
        tensors are float64). ``scores.argmax(1)`` is the prediction; ties go to the lower class.
    """
    _check_knn_inputs(train_features, train_labels, query_features, num_classes, k, temperature, chunk_size)
    device = train_features.device
    # Half precision loses too much in the similarities near 1 that decide the neighbours.
    dtype = torch.promote_types(torch.promote_types(train_features.dtype, query_features.dtype), torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(device=device, dtype=torch.long)
    k = min(k, train.shape[0])

    scores = torch.zeros(query_features.shape[0], num_classes, dtype=dtype, device=device)
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].to(device=device, dtype=dtype), dim=1)
        sim, index = (query @ train.T).topk(k, dim=1)
        votes = (sim / temperature).exp()
        scores[start : start + query.shape[0]].scatter_add_(1, labels[index], votes)
    return scores


def knn_topk_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 (and top-5) accuracy of :func:`knn_classify` on a labelled test set.

    Args:
        train_features, train_labels: (N, F) and (N,).
        test_features, test_labels: (Q, F) and (Q,), Q >= 1.
        num_classes: C; ``None`` infers ``max(label) + 1`` over both label sets.
        k, temperature, chunk_size: as in :func:`knn_classify`.

    Returns:
        ``{"top1": ...}`` and, when C >= 5, ``"top5"``; fractions in [0, 1]. Classes that got no
        vote score 0, so top-5 may include some of them when fewer than 5 classes were voted for.
    """
    if test_features.ndim != 2 or test_features.shape[0] == 0:
        raise ValueError(f"test_features must be a non-empty (Q, F) tensor, got {tuple(test_features.shape)}")
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must have shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if num_classes is None:
        if train_labels.numel() == 0:
            raise ValueError("the training set is empty")
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if test_labels.min() < 0 or test_labels.max() >= num_classes:
        raise ValueError(f"test_labels must lie in [0, {num_classes}), got [{test_labels.min()}, {test_labels.max()}]")
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    return topk_accuracy(scores, test_labels)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_classify`; arguments as in :func:`knn_topk_accuracy`."""
    return knn_topk_accuracy(
        train_features, train_labels, test_features, test_labels, num_classes, k, temperature
    )["top1"]
