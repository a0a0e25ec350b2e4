"""Autograd-aware collectives and a BatchNorm with global batch statistics.

The rule that keeps several processes exact: every process computes the same global loss, and
each reduction's backward sums the gradients over processes. Each process's parameters then get
`world_size` times their share of the true gradient, and DDP's averaging restores it exactly.
`torch.distributed.all_reduce` is not part of autograd; `_functional_collectives` is.

torch's `SyncBatchNorm` refuses CPU tensors, so `GlobalBatchNorm` implements the same statistics
with these collectives: it runs on gloo (CPU) and NCCL alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


__all__ = [
    "GlobalBatchNorm",
    "convert_to_global_batchnorm",
    "gather_rows",
    "global_count",
    "is_distributed",
    "sum_across_processes",
]


def is_distributed() -> bool:
    """True when torch.distributed runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_processes(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity on one); its backward sums the gradients over processes."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD) if is_distributed() else x


def global_count(local: int, device: torch.device) -> int:
    """Sum of an integer over processes (no gradient)."""
    if not is_distributed():
        return local
    total = torch.tensor([local], device=device, dtype=torch.long)
    dist.all_reduce(total)
    return int(total.item())


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows of the 2-d tensor `x`, concatenated, with gradients flowing back.

    Shorter local batches are zero-padded to the longest, so callers must be indifferent to
    zero rows (true of Gram products of standardised views)."""
    if not is_distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    longest = int(max(s.item() for s in sizes))
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    return funcol.all_gather_single_autograd(x, 0, dist.group.WORLD)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across processes.

    A drop-in for BatchNorm1d/2d/3d with the same parameters, buffers and state-dict keys; on one
    process, or in eval mode, it is exactly the wrapped BatchNorm. Input (N, C, *).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least a 2-d input (N, C, ...), got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        reduce_dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = global_count(input.numel() // input.shape[1], input.device)
        if count < 2:
            raise ValueError("BatchNorm needs more than one value per channel across all processes.")
        # Two passes (mean, then centred squares) avoid E[x^2] - E[x]^2 cancellation.
        mean = sum_across_processes(input.sum(reduce_dims, dtype=torch.float32)) / count
        centred = input - mean.view(shape).to(input.dtype)
        var = sum_across_processes(centred.float().square().sum(reduce_dims)) / count
        output = centred * torch.rsqrt(var + self.eps).view(shape).to(input.dtype)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in `module` by a `GlobalBatchNorm` holding the same tensors.

    Like `nn.SyncBatchNorm.convert_sync_batchnorm`, but differentiable on every backend. Returns
    the converted module (the same object unless `module` itself is a BatchNorm)."""
    # Exact types only: subclasses such as timm's BatchNormAct2d carry more than statistics.
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        converted.train(module.training)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        return converted
    for name, child in module.named_children():
        replacement = convert_to_global_batchnorm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
