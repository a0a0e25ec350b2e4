"""Working across processes: the accelerator of a launch, how its processes exchange gradients
(DDP options handed to accelerate), agreement between processes, and reading a device flag
without stalling the device."""

from __future__ import annotations

from collections.abc import Callable

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

__all__ = [
    "DDP_COMM_HOOKS", "all_processes", "create_accelerator", "ddp_kwargs_handlers", "is_finite_later", "launched_processes",
]

logger = logging.getLogger(__name__)

# accelerate's names; "fp16" and PowerSGD are left out: fp16 overflows on large gradients, and
# PowerSGD's low-rank approximation changes the update, so neither keeps the run comparable.
DDP_COMM_HOOKS = ("no", "bf16")


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started: 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def create_accelerator(**kwargs) -> Accelerator:
    """accelerate's ``Accelerator(**kwargs)`` for this launch: without a GPU, accelerate only takes
    several launched processes as one job (gloo) when told ``cpu=True``."""
    return Accelerator(cpu=launched_processes() > 1 and not torch.cuda.is_available(), **kwargs)


def is_finite_later(value: torch.Tensor) -> Callable[[], bool]:
    """Start reading whether ``value`` (e.g. the loss, right after the forward pass) is finite;
    call the result to get the answer.

    On CUDA the answer is copied to the host right behind the forward pass, so asking for it after
    the backward pass has been queued waits for the forward pass only: the device keeps working.
    ``bool(torch.isfinite(loss))`` at that point would wait for the backward pass as well, and
    asked before it, leaves the device idle while the host queues it.
    """
    finite = torch.isfinite(value.detach())
    if finite.device.type != "cuda":
        return lambda: bool(finite)
    on_host = finite.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> bool:
        copied.synchronize()
        return bool(on_host)

    return read


def all_processes(accelerator: Accelerator | None, *flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it holds on every process: streams can end, or run short of readable
    images, at different steps, and every process must then take the same branch. One reduction
    (one host sync) for all flags."""
    if accelerator is None or accelerator.num_processes == 1:
        return tuple(flags)
    value = torch.tensor([int(flag) for flag in flags], device=accelerator.device)
    return tuple(bool(v) for v in (accelerator.reduce(value, reduction="sum") == accelerator.num_processes).tolist())


def ddp_kwargs_handlers(comm_hook: str, num_processes: int) -> list[DistributedDataParallelKwargs]:
    """`Accelerator(kwargs_handlers=...)` for `--ddp_comm_hook`.

    "bf16" registers torch's `bf16_compress_hook` on the DDP model (for gloo and NCCL alike): each
    gradient bucket is cast to bf16 and divided by the number of processes, summed across them,
    then written back in fp32. Half the bytes of the default fp32 all-reduce; every gradient is
    rounded to 8 bits of mantissa before the optimizer sees it. "no" keeps DDP's fp32 all-reduce.
    """
    if comm_hook not in DDP_COMM_HOOKS:
        raise ValueError(f"--ddp_comm_hook must be one of {', '.join(DDP_COMM_HOOKS)}, got {comm_hook!r}.")
    if comm_hook == "no":
        return []
    if num_processes == 1:
        logger.warning(f"--ddp_comm_hook {comm_hook} does nothing with one process: no gradients are exchanged.")
    return [DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType(comm_hook))]
