"""The image classifier's loss, chosen by `config.problem_type` as transformers' classifiers choose it.

Imports only torch and transformers: copied into saved folders as remote code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig


__all__ = ["PROBLEM_TYPES", "image_classification_loss", "infer_problem_type"]

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """transformers' rule when `problem_type` is unset: one output is regression; integer labels
    are class ids; anything else (float, bool) is one target per class."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def image_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
    """The loss of `logits` (B, num_labels) against `labels`, computed in float32:

    * `"regression"`: mean squared error; labels (B,) or (B, 1) for one output, (B, num_labels)
      otherwise; integer labels are taken as numbers.
    * `"single_label_classification"`: cross-entropy on class ids (B,) (-100 is ignored).
    * `"multi_label_classification"`: binary cross-entropy with logits on (B, num_labels) targets.

    An unset `config.problem_type` is inferred as transformers does (see `infer_problem_type`) and
    recorded in the config, as transformers records it. Labels that do not fit the problem type
    raise ValueError saying which problem type was used and what it needs.
    """
    num_labels, batch = logits.shape[-1], logits.shape[0]
    problem_type = config.problem_type
    inferred = problem_type is None
    if inferred:
        problem_type = infer_problem_type(num_labels, labels)
    elif problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type={problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}.")
    how = (
        f"problem_type was inferred as {problem_type!r} from num_labels={num_labels} and {_dtype(labels)} labels"
        if inferred else f"problem_type={problem_type!r}"
    )
    labels = labels.to(logits.device)
    logits = logits.float()

    if problem_type == "single_label_classification":
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(
                f"{how} needs integer class ids, got {_dtype(labels)} labels. Pass class ids as integers; "
                "for one 0/1 target per class use 'multi_label_classification', for numbers 'regression'."
            )
        if labels.numel() != batch:
            raise ValueError(f"{how} needs one class id per image, shape ({batch},); got labels of shape {tuple(labels.shape)}.")
        loss = nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1).long(), ignore_index=-100)
    elif problem_type == "multi_label_classification":
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(
                f"{how} needs one 0/1 target per class, shape {tuple(logits.shape)}; got labels of shape "
                f"{tuple(labels.shape)}. For one class id per image pass integer labels (or set "
                "problem_type='single_label_classification')."
            )
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    else:  # regression
        if labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"{how} needs numeric targets, got {_dtype(labels)} labels.")
        if num_labels == 1:
            if labels.numel() != batch:
                raise ValueError(f"{how} with one output needs one target per image, shape ({batch},); got {tuple(labels.shape)}.")
            loss = nn.functional.mse_loss(logits.squeeze(), labels.float().squeeze())
        else:
            if tuple(labels.shape) != tuple(logits.shape):
                raise ValueError(f"{how} needs targets of shape {tuple(logits.shape)}; got {tuple(labels.shape)}.")
            loss = nn.functional.mse_loss(logits, labels.float())
    if inferred:
        config.problem_type = problem_type
    return loss


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
