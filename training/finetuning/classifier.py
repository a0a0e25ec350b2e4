"""Training and evaluating a whole classification network (semi-supervised evaluation and
barlow-finetune): parameter groups with separate backbone and head learning rates, the loop,
and top-k evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..shared.distributed import all_processes
from ..shared.metrics import accuracy_from_counts, topk_correct

__all__ = [
    "FitSummary",
    "classifier_optimizer",
    "evaluate_classifier",
    "fit_classifier",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ fine-tuning a model
@dataclass
class FitSummary:
    """What :func:`fit_classifier` did: optimizer steps, and the readable and unreadable images of
    its first epoch (one pass over this process's share of the data)."""

    steps: int = 0
    readable_images: int = 0
    skipped_images: int = 0


def classifier_optimizer(
    model: nn.Module,
    head: nn.Module,
    name: str = "sgd",
    backbone_learning_rate: float = 0.005,
    head_learning_rate: float = 0.5,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW with one learning rate for the head and another for everything
    else; weight decay only on weights with more than one dimension (not biases or norms). Each
    group records ``peak_lr`` for :func:`training.shared.optim.create_scheduler`; frozen parameters are
    left out."""
    head_ids = {id(p) for p in head.parameters()}
    groups = []
    for part, lr in (("backbone", backbone_learning_rate), ("head", head_learning_rate)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head_ids) == (part == "head")]
        for kind, decay in (("weights", weight_decay), ("biases", 0.0)):
            chosen = [p for p in params if (p.ndim > 1) == (kind == "weights")]
            if chosen:
                groups.append({"name": f"{part}_{kind}", "params": chosen, "lr": lr, "peak_lr": lr, "weight_decay": decay})
    if not groups:
        raise ValueError("The model has no trainable parameters.")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    raise ValueError(f"Unknown optimizer {name!r}; choose sgd or adamw.")


def fit_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    make_loader: Callable[[int], Iterable[dict]],
    total_steps: int,
    *,
    accelerator=None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> FitSummary:
    """Train ``model`` (cross-entropy on its ``logits``) for ``total_steps`` optimizer steps over
    epochs of ``make_loader(epoch)``. Batches with fewer than 2 images are skipped (BatchNorm).
    With an ``accelerator`` (model and optimizer prepared), every process stops at the end of the
    shortest share. ``on_step(step, loss)`` (loss: a detached 0-d tensor on the device, so that no
    step waits for the accelerator; call ``.item()`` when logging) and ``on_epoch_end(epoch, step)``
    are called back.
    Returns the steps done and what the first epoch read (this process's share)."""
    device = accelerator.device if accelerator is not None else torch.device(device)
    step, epoch = 0, 0
    summary = FitSummary()
    while step < total_steps:
        model.train()
        batches = iter(make_loader(epoch))
        stepped = False
        while step < total_steps:
            batch = next(batches, None)
            has_batch = batch is not None
            has_batch, enough = all_processes(accelerator, has_batch, has_batch and batch["pixel_values"].shape[0] >= 2)
            if not has_batch:
                break
            if epoch == 0:
                summary.readable_images += batch["pixel_values"].shape[0]
                summary.skipped_images += int(batch.get("num_skipped", 0))
            if not enough:
                continue
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            logits = model(pixel_values=pixel_values).logits
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            stepped = True
            if on_step is not None:
                on_step(step, loss.detach())
        if on_epoch_end is not None:
            on_epoch_end(epoch, step)
        if not stepped:
            raise ValueError("An epoch produced no training batch of 2 or more readable images.")
        epoch += 1
    summary.steps = step
    return summary


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: Iterable[dict], num_classes: int, *, accelerator=None, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes) of ``model`` in eval mode over ``loader``; with an
    ``accelerator``, over every process's share."""
    device = accelerator.device if accelerator is not None else torch.device(device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    try:
        for batch in loader:
            if batch["pixel_values"].shape[0] == 0:
                continue
            labels = batch["labels"]
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"Evaluation labels must lie in [0, {num_classes}).")
            context = accelerator.autocast() if accelerator is not None else nullcontext()
            with context:
                logits = model(pixel_values=batch["pixel_values"].to(device)).logits
            totals += topk_correct(logits.float(), labels)
    finally:
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
    if totals[2] == 0:
        raise ValueError("The evaluation split has no readable images.")
    return accuracy_from_counts(totals, num_classes)
