"""How the trainer's processes exchange gradients: DDP options handed to accelerate."""

from __future__ import annotations

import logging

from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs


__all__ = ["DDP_COMM_HOOKS", "ddp_kwargs_handlers"]

logger = logging.getLogger(__name__)

# accelerate's names; "fp16" and PowerSGD are left out: fp16 overflows on large gradients, and
# PowerSGD's low-rank approximation changes the update, so neither keeps the run comparable.
DDP_COMM_HOOKS = ("no", "bf16")


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
