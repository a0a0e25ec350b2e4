"""Classification accuracy, top-1 and top-5, for every protocol (linear probes, kNN, fine-tuning), and
its summary over seeds."""

from __future__ import annotations

import torch

__all__ = ["accuracy_from_counts", "summarise_seeds", "topk_accuracy", "topk_correct"]


def topk_correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top-1 correct, top-5 correct, count]`` (float64 sums) of class ``scores`` (N, C) against
    ``labels`` (N,); sums over batches and processes add up."""
    labels = labels.to(scores.device).long()
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return torch.tensor(
        [(top5[:, 0] == labels).sum().item(), (top5 == labels[:, None]).any(1).sum().item(), labels.numel()],
        dtype=torch.float64,
    )


def accuracy_from_counts(counts: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``{"top1"}`` and, with at least 5 classes, ``{"top5"}``: fractions in [0, 1] of :func:`topk_correct`'s sums."""
    if counts[2] == 0:
        raise ValueError("No examples to measure accuracy on.")
    result = {"top1": (counts[0] / counts[2]).item()}
    if num_classes >= 5:
        result["top5"] = (counts[1] / counts[2]).item()
    return result


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes) accuracy of class scores (N, C) against labels (N,)."""
    return accuracy_from_counts(topk_correct(scores, labels), scores.shape[1])


def summarise_seeds(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """The same metrics measured once per seed, summarised: for each key ``k`` (e.g. ``linear_top1``),
    ``k_mean``, ``k_std`` (the sample standard deviation, ddof=1: an error bar from few seeds) and
    ``k_min``, and ``k`` itself as the mean, so that readers of a single run's keys read the mean."""
    import statistics

    summary: dict[str, float] = {}
    for key in per_seed[0]:
        values = [run[key] for run in per_seed]
        mean = statistics.fmean(values)
        summary[key] = mean
        summary[f"{key}_mean"] = mean
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[f"{key}_min"] = min(values)
    return summary
