"""Autograd-aware collectives and a BatchNorm with global batch statistics.

The rule that keeps several processes exact: every process computes the same global loss, and
each reduction's backward sums the gradients over processes. Each process's parameters then get
`world_size` times their share of the true gradient, and DDP's averaging restores it exactly.
`torch.distributed.all_reduce` is not part of autograd; `_functional_collectives` is.

Batch statistics cost one collective per layer each way and no host read (:func:`global_batch_norm`):
forward, each process's count, mean and centred sum of squares travel in one fp32 vector and every
process merges them (Chan et al.'s pairwise update, as torch's SyncBatchNorm does); backward, the
two per-channel gradient sums travel in one all-reduce. The counts stay on the device (a process's
count is exact in fp32 up to 2^24 values per channel, and only weighs the merge), so nothing waits
for them. The per-element work runs in torch's fused BatchNorm kernels, on CPUs and GPUs alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


__all__ = [
    "GlobalBatchNorm",
    "convert_to_global_batchnorm",
    "gather_rows",
    "global_batch_norm",
    "is_distributed",
    "sum_across_processes",
]


def is_distributed() -> bool:
    """True when torch.distributed runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_processes(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity on one); its backward sums the gradients over processes."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD) if is_distributed() else x


def gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """All processes' rows of the 2-d tensor `x`, concatenated, with gradients flowing back.

    `sizes` holds every process's row count. Shorter local batches are zero-padded to the longest,
    so callers must be indifferent to zero rows (true of Gram products of standardised views)."""
    if not is_distributed():
        return x
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    return funcol.all_gather_single_autograd(x, 0, dist.group.WORLD)


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Training-mode batch normalisation of (N, C, *) over every process's batch.

    Forward: local mean and variance (torch's fused statistics kernel), one all_gather of (count,
    mean, centred sum of squares), the merge, then torch's fused normalisation with the global
    statistics. Backward: the local sums of dy and dy * x_hat (torch's fused backward kernel), one
    all-reduce of the two, then the input's gradient from the global sums; the weight's and the
    bias's gradients stay local, for DDP to average."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        channels = x.shape[1]
        count = x.numel() // channels
        local = x.new_zeros(2 * channels + 1, dtype=torch.float32)
        local[0] = count
        if count:
            # fp32 placeholders (left unchanged: momentum 0) make torch accumulate bf16 input in fp32.
            scratch = (x.new_zeros(channels, dtype=torch.float32), x.new_ones(channels, dtype=torch.float32))
            mean, var = torch.batch_norm_update_stats(x, *scratch, 0.0)
            local[1:channels + 1], local[channels + 1:] = mean, var * count
        gathered = funcol.all_gather_tensor(local, 0, dist.group.WORLD).view(dist.get_world_size(), -1)
        counts = gathered[:, :1]
        means, sums_of_squares = gathered[:, 1:channels + 1], gathered[:, channels + 1:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        # Each process's squares about its own mean, plus what its mean's offset adds: no
        # E[x^2] - E[x]^2 cancellation.
        var = (sums_of_squares.sum(0) + (counts * (means - mean).square()).sum(0)) / total
        output = F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.eps = eps
        counts = counts.view(-1)
        ctx.mark_non_differentiable(mean, var, counts)
        return output, mean, var, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _mean, _var, _counts):
        x, weight, mean, var, total = ctx.saved_tensors
        channels = x.shape[1]
        if x.numel():
            # In eval mode torch's kernel gives the weight's gradient sum(dy * x_hat) and the bias's
            # sum(dy), with x_hat from the statistics passed: the global ones.
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_output, x, None, mean, var, None, None, False, ctx.eps, [False, True, True]
            )
        else:
            sum_dy_xhat = sum_dy = mean.new_zeros(channels)
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = funcol.all_reduce(torch.cat([sum_dy, sum_dy_xhat]), "sum", dist.group.WORLD)
            global_dy, global_dy_xhat = sums[:channels], sums[channels:]
            invstd = torch.rsqrt(var + ctx.eps)
            scale = invstd if weight is None else invstd * weight
            shape = [1, channels] + [1] * (x.dim() - 2)
            # dx = scale * (dy - sum(dy) / N - x_hat * sum(dy * x_hat) / N), in fp32, centred first.
            offset = (-scale * global_dy / total).view(shape)
            slope = (-scale * invstd * global_dy_xhat / total).view(shape)
            grad_input = torch.addcmul(offset, x.float() - mean.view(shape), slope)
            grad_input = grad_input.addcmul_(grad_output.float(), scale.view(shape)).to(x.dtype)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None


def global_batch_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm in training mode over every process's batch, with exact gradients.

    Args:
        x: (N, C, *) on this process; N may differ between processes, and be 0. Any float dtype.
        weight, bias: (C,) or None.
        eps: added to the variance.

    Returns:
        The normalised x (its shape and dtype); the global mean and biased variance, fp32 (C,); and
        each process's count of values per channel, an fp32 (world_size,) tensor on the device.
        One collective forward, one backward, no host read. Needs torch.distributed initialised.
    """
    if x.dim() < 2 or x.shape[1] == 0:
        raise ValueError(f"expected an (N, C, ...) input with C > 0, got shape {tuple(x.shape)}")
    # The statistics and the backward's sums in fp32 whatever autocast does around the layer.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _GlobalBatchNormFunction.apply(x, weight, bias, eps)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across processes.

    A drop-in for BatchNorm1d/2d/3d with the same parameters, buffers and state-dict keys; on one
    process, or in eval mode, it is exactly the wrapped BatchNorm. Input (N, C, *), output the same.

    Unlike `nn.SyncBatchNorm` it runs on every backend (gloo on CPUs too) and never waits for the
    device (:func:`global_batch_norm`). On CUDA it runs torch's SyncBatchNorm by default
    (`use_torch_kernels_on_cuda`): the same statistics and gradients from torch's own kernels, but
    torch reads the gathered counts back to the host once per layer (to drop empty processes),
    outside CUDA-graph capture. Set the attribute to False for the path without that read; which of
    the two is faster on a GPU has not been measured.
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
        output, mean, var, counts = global_batch_norm(input, self.weight, self.bias, self.eps)
        total = counts.sum()
        if input.numel() // input.shape[1] < 2 and float(total) < 2:
            # Read only where the local batch alone cannot prove there are two values: with a total
            # below 2, every process is such a one, so all of them raise together.
            raise ValueError("BatchNorm needs more than one value per channel across all processes.")
        if self.track_running_stats:
            self._update_running_stats(mean, var * total / (total - 1).clamp_min(1))
        return output

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
