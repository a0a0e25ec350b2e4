"""Optimiser and learning-rate schedule for Barlow Twins pre-training.

Follows the paper's recipe (Zbontar et al., 2021, and the authors' release):

* LARS with momentum 0.9, trust coefficient 0.001 and weight decay 1.5e-6;
* one-dimensional parameters (biases, norm weights and biases) get neither weight decay
  nor the LARS trust ratio, and have their own learning rate;
* learning rates scale with ``global_batch_size / 256``;
* linear warm-up, then cosine decay to 0.001 of the peak, updated every step (transformers'
  schedule of that shape, which is the authors' formula).

LARS is ``timm.optim.Lars``. Its trust ratio is ``eta*||w|| / (||g|| + wd*||w|| + eps)``,
whereas the paper's is ``eta*||w|| / ||g + wd*w||``. Both denominators agree when ``wd`` is 0
or ``g`` is parallel to ``w`` (up to ``eps``); otherwise timm's is an upper bound, and with
``wd = 1.5e-6`` the relative difference is of order ``wd*||w||/||g||``, far below noise.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

import torch
from timm.optim import Lars
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_with_min_lr_schedule_with_warmup

__all__ = [
    "OPTIMIZER_NAMES",
    "StepPlan",
    "create_optimizer",
    "create_scheduler",
    "has_transformer_tokens",
    "no_weight_decay_names",
    "plan_steps",
    "split_parameter_groups",
    "warmup_steps_from_epochs",
]

OPTIMIZER_NAMES: tuple[str, ...] = ("lars", "sgd", "adamw")

# The paper scales learning rates linearly with the batch, relative to 256.
_REFERENCE_BATCH = 256

logger = logging.getLogger(__name__)


def split_parameter_groups(
    model: nn.Module, weight_decay: float, lr_weights: float, lr_biases: float
) -> list[dict]:
    """Split trainable parameters into the paper's two optimiser groups.

    Returns ``[weights, biases]``, always in that order and always both present (possibly
    with an empty ``params`` list) so that group indices are stable across models and
    checkpoints:

    * ``"weights"``: parameters with ``ndim > 1``; ``weight_decay`` and ``lr_weights``.
    * ``"biases"``: parameters with ``ndim <= 1`` (biases, norm weights and biases), and the
      tokens and position embeddings that timm marks in a module's ``no_weight_decay()``
      (a ViT's ``pos_embed``, ``cls_token``, ...; see :func:`no_weight_decay_names`);
      weight decay 0 and ``lr_biases``.

    Each group records its peak learning rate under ``"peak_lr"`` so that the schedule can
    rescale from it. Parameters with ``requires_grad=False`` are skipped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if lr_weights < 0 or lr_biases < 0:
        raise ValueError(f"learning rates must be >= 0, got {lr_weights} and {lr_biases}")
    weights: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    excluded = no_weight_decay_names(model)
    for name, param in model.named_parameters():  # deduplicates tied parameters
        if not param.requires_grad:
            continue
        is_weight = param.ndim > 1 and not name.endswith(".bias") and name not in excluded
        (weights if is_weight else biases).append(param)
    if not weights and not biases:
        raise ValueError("model has no trainable parameters")
    return [
        {
            "name": "weights",
            "params": weights,
            "weight_decay": weight_decay,
            "lr": lr_weights,
            "peak_lr": lr_weights,
        },
        {
            "name": "biases",
            "params": biases,
            "weight_decay": 0.0,
            "lr": lr_biases,
            "peak_lr": lr_biases,
        },
    ]


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of the parameters that a submodule lists in its
    ``no_weight_decay()``, as timm's models do for tokens and position embeddings (ViT:
    ``pos_embed``, ``cls_token``, ``reg_token``, ``dist_token``; Swin: its position bias tables).
    Entries are matched against the submodule's own parameter names, with wildcards, as timm's
    optimizer factory matches them."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if not callable(listed):
            continue
        patterns = set(listed())
        for name, _ in module.named_parameters():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def has_transformer_tokens(model: nn.Module) -> bool:
    """Whether the model holds tokens or position embeddings excluded from weight decay: a
    Vision Transformer (ViT, DeiT, Swin, ...), for which LARS is a poor optimiser."""
    return bool(no_weight_decay_names(model))


def create_optimizer(
    model: nn.Module,
    name: str,
    learning_rate_weights: float,
    learning_rate_biases: float,
    weight_decay: float,
    global_batch_size: int,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    trust_clip: bool = False,
) -> torch.optim.Optimizer:
    """Build ``"lars"``, ``"sgd"`` or ``"adamw"`` over :func:`split_parameter_groups`.

    Learning rates are ``learning_rate_* * global_batch_size / 256``. ``momentum`` is used by
    LARS and SGD; ``trust_coefficient`` and ``trust_clip`` only by LARS. With ``trust_clip`` a
    weight's step factor is ``min(trust ratio, lr)`` instead of ``lr * trust ratio`` (LARC's
    clip mode, as in solo-learn's small-image recipes). AdamW gets the same learning-rate
    numbers, so callers should pass values suited to Adam.
    """
    key = name.lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    if trust_coefficient <= 0:
        raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
    scale = global_batch_size / _REFERENCE_BATCH
    groups = split_parameter_groups(
        model, weight_decay, learning_rate_weights * scale, learning_rate_biases * scale
    )
    if key == "lars":
        if has_transformer_tokens(model):
            logger.warning(
                "LARS on a Vision Transformer: it is reported to collapse ViTs' representations (watch rankme in the "
                "logs). The ViT recipe is AdamW with warm-up and cosine: --config benchmarks/configs/vit_adamw.yaml "
                "(see benchmarks/RESULTS.md)."
            )
        # timm skips the trust ratio in any group whose weight decay is 0 unless
        # always_adapt is set. The paper adapts every multi-dimensional weight regardless
        # of decay, so the weights group opts in (identical when wd > 0, and still right
        # when wd = 0) while the biases group keeps the default exclusion.
        groups[0]["always_adapt"] = True
        groups[1]["always_adapt"] = False
        return Lars(
            groups,
            lr=groups[0]["lr"],
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coeff=trust_coefficient,
            trust_clip=trust_clip,
            always_adapt=False,
        )
    if key == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def create_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, final_ratio: float = 0.001
) -> LambdaLR:
    """The paper's per-step schedule for every group's peak lr: linear warm-up from 0 over
    ``warmup_steps``, then cosine decay to ``final_ratio`` of the peak at ``total_steps``.

    This is transformers' ``get_cosine_with_min_lr_schedule_with_warmup``, whose formula is the
    authors' (``q = 0.5 (1 + cos(pi s / (T - w)))``, ``lr = peak (q + final_ratio (1 - q))``).
    Call ``scheduler.step()`` once after every ``optimizer.step()``. Each group's peak is its
    ``"peak_lr"`` (recorded by :func:`split_parameter_groups`), else its current lr.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps} (it must not exceed the run)")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
    for group in optimizer.param_groups:
        group.setdefault("peak_lr", group["lr"])
        # LambdaLR scales "initial_lr" but only sets it when absent; pin it to the peak so a
        # stale value (e.g. from an earlier scheduler) cannot leak in.
        group["initial_lr"] = group["peak_lr"]
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=final_ratio)


def warmup_steps_from_epochs(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Number of warm-up steps for ``warmup_epochs`` epochs, rounded to the nearest step."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    return round(warmup_epochs * steps_per_epoch)


# The paper warms up for 10 of its 1000 epochs; without a dataset size, 1% of the steps does the same.
DEFAULT_WARMUP_EPOCHS = 10.0
FALLBACK_WARMUP_RATIO = 0.01


@dataclass
class StepPlan:
    """How long a run is: optimizer steps per epoch (None when the data's size is unknown), total
    steps and warm-up steps, and where the warm-up length came from (for the log)."""

    steps_per_epoch: int | None
    total_steps: int
    warmup_steps: int
    warmup_source: str


def plan_steps(
    num_examples: int | None,
    steps_per_example_batch: int,
    *,
    num_train_epochs: float,
    max_train_steps: int | None = None,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    warmup_epochs: float | None = None,
) -> StepPlan:
    """Resolve the run's length and warm-up.

    Args:
        num_examples: examples per epoch (after any sample cap), or None when unknown.
        steps_per_example_batch: examples per optimizer step (the global batch: per-device batch x
            processes x accumulation steps).
        num_train_epochs, max_train_steps: the length; ``max_train_steps`` wins when given.
        warmup_steps, warmup_ratio, warmup_epochs: the warm-up, first given wins in that order
            (HF's precedence of steps over ratio). With none of them: 10 epochs when the size is
            known (the paper's), else 1% of the steps (10 of the paper's 1000 epochs).

    Raises:
        ValueError: no full step per epoch; or neither the size nor ``max_train_steps`` is known.
    """
    steps_per_epoch = None
    if num_examples is not None:
        steps_per_epoch = num_examples // steps_per_example_batch
        if steps_per_epoch == 0:
            raise ValueError(
                f"{num_examples} training examples make no full step of {steps_per_example_batch} images "
                "(batch x processes x accumulation steps); lower --per_device_train_batch_size."
            )
    if max_train_steps:
        total = max_train_steps
    elif steps_per_epoch is not None:
        total = math.ceil(num_train_epochs * steps_per_epoch)
    else:
        raise ValueError("The dataset does not say how many examples it has: pass --max_train_steps.")
    if warmup_steps is not None:
        warmup, source = warmup_steps, "--warmup_steps"
    elif warmup_ratio is not None:
        warmup, source = math.ceil(warmup_ratio * total), f"--warmup_ratio {warmup_ratio:g}"
    elif steps_per_epoch is not None:
        epochs = DEFAULT_WARMUP_EPOCHS if warmup_epochs is None else warmup_epochs
        warmup, source = warmup_steps_from_epochs(epochs, steps_per_epoch), f"{epochs:g} epochs"
    elif warmup_epochs is not None:
        raise ValueError(
            "--warmup_epochs needs the dataset's size, which it does not record: give --warmup_steps or --warmup_ratio."
        )
    else:
        warmup = math.ceil(FALLBACK_WARMUP_RATIO * total)
        source = "1% of the steps (the dataset's size is unknown; 10 of the paper's 1000 epochs)"
    return StepPlan(steps_per_epoch, total, min(warmup, total), source)
