"""Agreement between processes inside a training loop."""

from __future__ import annotations

import torch
from accelerate import Accelerator

__all__ = ["all_processes"]


def all_processes(accelerator: Accelerator | None, *flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it holds on every process: streams can end, or run short of readable
    images, at different steps, and every process must then take the same branch. One reduction
    (one host sync) for all flags."""
    if accelerator is None or accelerator.num_processes == 1:
        return tuple(flags)
    value = torch.tensor([int(flag) for flag in flags], device=accelerator.device)
    return tuple(bool(v) for v in (accelerator.reduce(value, reduction="sum") == accelerator.num_processes).tolist())
