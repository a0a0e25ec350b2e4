"""Autograd-aware collectives and a BatchNorm with global batch statistics.

The rule that keeps several processes exact: every process computes the same global loss, and
each reduction's backward sums the gradients over processes. Each process's parameters then get
`world_size` times their share of the true gradient, and DDP's averaging restores it exactly.
`torch.distributed.all_reduce` is not part of autograd; `_functional_collectives` is.

Batch statistics cost one collective per layer and no host sync: each process sends its count,
mean and centred sum of squares in one fp32 vector, and every process merges the gathered
vectors (Chan et al.'s pairwise update, as torch's SyncBatchNorm does). Counts stay on the device
(a process's count is exact in fp32 up to 2^24 values per channel, and only weights the merge),
so nothing waits for them; the gather's backward is one reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


__all__ = [
    "GlobalBatchNorm",
    "batch_moments",
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
    """Sum of an integer over processes (no gradient). One collective and one host read: call it
    once per step at most; per-layer statistics use :func:`batch_moments` instead."""
    if not is_distributed():
        return local
    total = torch.tensor([local], device=device, dtype=torch.long)
    dist.all_reduce(total)
    return int(total.item())


def gather_rows(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """All processes' rows of the 2-d tensor `x`, concatenated, with gradients flowing back.

    Shorter local batches are zero-padded to the longest, so callers must be indifferent to
    zero rows (true of Gram products of standardised views). `sizes`, every process's row count
    when the caller knows them, saves a gather of the sizes and a host read."""
    if not is_distributed():
        return x
    if sizes is None:
        gathered = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        sizes = torch.cat(gathered).tolist()
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    return funcol.all_gather_single_autograd(x, 0, dist.group.WORLD)


def _local_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and centred sum of squares per channel (dimension 1) of the local `x`, in fp32."""
    reduce_dims = [0, *range(2, x.dim())]
    if x.numel() == 0:
        # Weighs nothing in the merge, but stays in the graph: every process must then run the
        # gather's backward collective, or the others would wait for this one forever.
        zeros = x.float().sum(reduce_dims)
        return zeros, zeros
    var, mean = torch.var_mean(x.float(), reduce_dims, correction=0)
    return mean, var * (x.numel() // x.shape[1])


def batch_moments(*tensors: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Mean and biased variance per channel over every process's batch, with gradients.

    Args:
        tensors: (N, C, *) tensors with the same N and trailing sizes on this process (for
            instance the two views of a batch); any float dtype.

    Returns:
        The count per process, an fp32 (world_size,) tensor on the device (values per channel:
        N times the trailing sizes), and an fp32 (mean, variance) pair of (C,) tensors for each
        input. On several processes this is one all_gather (its backward one reduce-scatter) and
        no host read.
    """
    count = tensors[0].numel() // tensors[0].shape[1] if tensors[0].shape[1] else 0
    locals_ = [_local_moments(x) for x in tensors]
    if not is_distributed():
        counts = torch.full((1,), float(count), device=tensors[0].device)
        return counts, [(mean, m2 / max(count, 1)) for mean, m2 in locals_]
    packed = torch.cat([torch.full((1,), float(count), device=tensors[0].device)]
                       + [part for moments in locals_ for part in moments])
    gathered = funcol.all_gather_single_autograd(packed, 0, dist.group.WORLD).view(dist.get_world_size(), -1)
    counts = gathered[:, 0].detach()
    total = counts.sum()
    weights = (counts / total).unsqueeze(1)  # (world, 1)
    merged, offset = [], 1
    for x in tensors:
        channels = x.shape[1]
        means = gathered[:, offset:offset + channels]
        sums_of_squares = gathered[:, offset + channels:offset + 2 * channels]
        offset += 2 * channels
        mean = (weights * means).sum(0)
        # Each process's squares about its own mean, plus what its mean's offset adds: no
        # E[x^2] - E[x]^2 cancellation.
        m2 = sums_of_squares.sum(0) + (counts.unsqueeze(1) * (means - mean).square()).sum(0)
        merged.append((mean, m2 / total))
    return counts, merged


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across processes.

    A drop-in for BatchNorm1d/2d/3d with the same parameters, buffers and state-dict keys; on one
    process, or in eval mode, it is exactly the wrapped BatchNorm. Input (N, C, *), output the same.

    Unlike `nn.SyncBatchNorm` it runs on every backend (gloo on CPUs too) and its statistics
    (:func:`batch_moments`) never wait for the device. On CUDA it uses torch's SyncBatchNorm
    kernels by default (`use_torch_kernels_on_cuda`): the same statistics and gradients with fused
    kernels, but torch reads the gathered counts back to the host once per layer (to drop empty
    processes), outside CUDA-graph capture. Set it to False on CUDA for the path without host sync.
    """

    use_torch_kernels_on_cuda: bool = True

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least a 2-d input (N, C, ...), got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        if input.is_cuda and self.use_torch_kernels_on_cuda:
            return self._forward_torch_kernels(input)
        shape = [1, -1] + [1] * (input.dim() - 2)
        # fp32 whatever the input's dtype (bf16 under autocast), as torch's own kernels compute.
        values = input.float()
        counts, [(mean, var)] = batch_moments(values)
        total = counts.sum()
        if input.numel() // input.shape[1] < 2 and float(total) < 2:
            # Read only where the local batch alone cannot prove there are two values: with a total
            # below 2, every process is such a one, so all of them raise together.
            raise ValueError("BatchNorm needs more than one value per channel across all processes.")
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        # Centred before scaling, as torch's kernels do: a large mean costs no precision forward or
        # backward (x * scale + shift would cancel).
        centred = values - mean.view(shape)
        if self.bias is None:
            output = centred * scale.view(shape)
        else:
            output = torch.addcmul(self.bias.view(shape), centred, scale.view(shape))
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * total / (total - 1).clamp_min(1))
        return output.to(input.dtype)

    def _forward_torch_kernels(self, input: torch.Tensor) -> torch.Tensor:
        """What `nn.SyncBatchNorm` runs in training (DDP refuses that class on CPU modules, so it is
        called here rather than inherited)."""
        from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # torch's kernel takes the cumulative average's weight as a float
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean, running_var = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, momentum,
            dist.group.WORLD, dist.get_world_size(),
        )

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # A tensor weight for the cumulative average (momentum None): no host read of the count.
        momentum = 1.0 / self.num_batches_tracked.float() if self.momentum is None else self.momentum
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
