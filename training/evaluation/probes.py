"""Linear probes on frozen features: the on-disk feature cache, the paper's SGD protocol
(:func:`sgd_linear_probe`) and an exact logistic regression (:func:`exact_linear_probe`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modeling_barlow import init_linear_evaluation_head

from ..shared.labelled_data import LabelledData
from ..shared.model_source import ModelSource
from ..shared.optim import create_scheduler
from .features import extract_features

__all__ = [
    "cached_features",
    "exact_linear_probe",
    "fit_linear_head",
    "linear_head",
    "sgd_linear_probe",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1

# ----------------------------------------------------------------------------------- feature cache
def _cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"{digest}.pt"


def cached_features(
    encoder_fn: Callable[[], nn.Module],
    model: ModelSource,
    data: LabelledData,
    split: str,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    autocast: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features (N, F) float32, labels (N,), whether they came from the cache) of one split
    ("train" or "eval"), preprocessed by the model's image processor, in stream order.

    The cache file is named by a hash of the model (its folder, file sizes and modification times,
    or hub commit), the data (source, split, columns, sample cap, local file stamps) and the
    preprocessing; ``cache_dir=None`` neither reads nor writes. ``encoder_fn`` is only called on
    a cache miss.
    """
    key = _cache_key(model, data, split)
    path = _cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == json.dumps(key, sort_keys=True, default=str):
                logger.info(f"Features of the {split} split loaded from the cache ({path}).")
                return saved["features"], saved["labels"], True
        except (OSError, RuntimeError, EOFError, KeyError, AttributeError):
            logger.warning(f"Ignoring an unreadable feature cache file {path}.")
    encoder = encoder_fn().to(device)
    loader = data.loader(split, model.eval_transform(), model.num_channels, batch_size, num_workers=num_workers)
    # Our own bar: extract_features(progress=True) asks len() of the loader, which a stream lacks.
    from tqdm.auto import tqdm

    batches = tqdm(loader, total=math.ceil(data.num_examples(split) / batch_size), desc=f"{split} features", leave=False)
    with autocast() if autocast is not None else nullcontext():
        features, labels = extract_features(encoder, batches, device)
    if features.shape[0] == 0:
        raise ValueError(f"The {split} split has no readable images.")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save({"key": json.dumps(key, sort_keys=True, default=str), "features": features, "labels": labels}, partial)
        os.replace(partial, path)  # readers never see half a file
        path.with_suffix(".json").write_text(json.dumps(key, indent=2, default=str))
    return features, labels, False


def _cache_key(model: ModelSource, data: LabelledData, split: str) -> dict:
    return {
        "version": CACHE_VERSION,
        "model": model.fingerprint,
        "preprocessing": model.preprocessing_key(),
        "data": data.identity,
        "split": data.eval_split if split == "eval" else data.train_split,
        "max_samples": data.max_samples(split),
        "label2id": sorted(map(str, data.label2id)) if data.label2id else None,
    }



# ------------------------------------------------------------------------------------ linear heads
def linear_head(num_features: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """The linear-evaluation head: weights N(0, 0.01), zero bias."""
    return init_linear_evaluation_head(nn.Linear(num_features, num_classes), generator)


def fit_linear_head(
    head: nn.Linear,
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    steps_per_epoch: int,
    learning_rate: float = 0.3,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
) -> nn.Linear:
    """The paper's linear protocol for the head: SGD with momentum and weight decay, the learning
    rate following a per-step cosine to 0.001 of its peak. ``epoch_batches(epoch)`` yields
    (features (B, F), labels (B,)) on the head's device."""
    optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)
    scheduler = create_scheduler(optimizer, total, 0)
    head.train()
    step = 0
    for epoch in range(epochs):
        for features, labels in epoch_batches(epoch):
            if step >= total:
                break
            loss = F.cross_entropy(head(features.float()), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    return head.eval()


def sgd_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 0.3,
    weight_decay: float = 1e-6,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class scores (Q, C) on ``test_features`` of a linear head trained with the paper's
    protocol on fixed features (batches reshuffled every epoch with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    head = linear_head(train_features.shape[1], num_classes, generator).to(device)
    x, y = train_features.to(device), train_labels.to(device)
    steps_per_epoch = math.ceil(len(x) / batch_size)

    def batches(epoch: int):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]

    fit_linear_head(head, batches, epochs, steps_per_epoch, learning_rate, weight_decay)
    with torch.no_grad():
        return head(test_features.to(device).float()).cpu()


def exact_linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class probabilities (Q, C) of multinomial logistic regression (scikit-learn, L-BFGS, C=1)
    on standardised features: a probe that needs no learning-rate schedule.
    Classes absent from the training labels get probability 0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features.numpy())
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_features.numpy()), train_labels.numpy())
    probabilities = probe.predict_proba(scaler.transform(test_features.numpy()))
    scores = torch.zeros(test_features.shape[0], num_classes, dtype=torch.float64)
    scores[:, torch.as_tensor(probe.classes_, dtype=torch.long)] = torch.as_tensor(probabilities, dtype=torch.float64)
    return scores
