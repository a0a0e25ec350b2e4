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
Several views stacked along the batch (`GlobalBatchNorm.views_in_batch`, set by
`view_batchnorm.views_in_batch`) are each normalised by their own global statistics, all of them
in that same one collective each way.
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
    """Training-mode batch normalisation of V views stacked as (V * n, C, *), each view over every
    process's rows of that view (V = 1: one plain batch).

    Forward: each view's local mean and variance (torch's fused statistics kernel), one all_gather of
    every view's (count, mean, centred sum of squares), the merge, then torch's fused normalisation of
    each view with its global statistics. Backward: each view's local sums of dy and dy * x_hat
    (torch's fused backward kernel), one all-reduce of them all, then the input's gradient from the
    global sums; the weight's and the bias's gradients stay local, for DDP to average.

    The statistics are fp32 for bf16/fp16/fp32 input and float64 for float64 input."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, num_views):
        channels = x.shape[1]
        views = x.unflatten(0, (num_views, -1))  # (V, n, C, *): view v is the contiguous block views[v]
        count = views[0].numel() // channels
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        local = x.new_zeros(num_views, 2 * channels + 1, dtype=stats_dtype)
        local[:, 0] = count
        if count:
            # Placeholders (left unchanged: momentum 0) in the statistics' dtype make torch accumulate
            # bf16 input in fp32.
            scratch = (x.new_zeros(channels, dtype=stats_dtype), x.new_ones(channels, dtype=stats_dtype))
            for view, row in zip(views, local):
                mean, var = torch.batch_norm_update_stats(view, *scratch, 0.0)
                row[1:channels + 1], row[channels + 1:] = mean, var * count
        gathered = funcol.all_gather_tensor(local.view(-1), 0, dist.group.WORLD)
        gathered = gathered.view(dist.get_world_size(), num_views, -1)
        counts = gathered[..., :1]  # (world, V, 1)
        means, sums_of_squares = gathered[..., 1:channels + 1], gathered[..., channels + 1:]
        total = counts.sum(0)  # (V, 1)
        mean = (counts * means).sum(0) / total  # (V, C)
        # Each process's squares about its own mean, plus what its mean's offset adds: no
        # E[x^2] - E[x]^2 cancellation.
        var = (sums_of_squares.sum(0) + (counts * (means - mean).square()).sum(0)) / total
        outputs = [
            F.batch_norm(view, view_mean, view_var, weight, bias, training=False, momentum=0.0, eps=eps)
            for view, view_mean, view_var in zip(views, mean, var)
        ]
        output = outputs[0] if num_views == 1 else torch.cat(outputs)
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.eps, ctx.num_views = eps, num_views
        counts = counts.squeeze(-1)
        ctx.mark_non_differentiable(mean, var, counts)
        return output, mean, var, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _mean, _var, _counts):
        x, weight, mean, var, total = ctx.saved_tensors
        channels, num_views = x.shape[1], ctx.num_views
        views, grad_views = x.unflatten(0, (num_views, -1)), grad_output.unflatten(0, (num_views, -1))
        if x.numel():
            # In eval mode torch's kernel gives the weight's gradient sum(dy * x_hat) and the bias's
            # sum(dy), with x_hat from the statistics passed: each view's global ones.
            sums = [
                torch.ops.aten.native_batch_norm_backward(
                    grad_view, view, None, view_mean, view_var, None, None, False, ctx.eps, [False, True, True]
                )[1:]
                for grad_view, view, view_mean, view_var in zip(grad_views, views, mean, var)
            ]
            sum_dy_xhat = torch.stack([dy_xhat for dy_xhat, _ in sums])  # (V, C)
            sum_dy = torch.stack([dy for _, dy in sums])
        else:
            sum_dy_xhat = sum_dy = mean.new_zeros(num_views, channels)
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = funcol.all_reduce(torch.cat([sum_dy, sum_dy_xhat], dim=1).view(-1), "sum", dist.group.WORLD)
            sums = sums.view(num_views, 2 * channels)
            invstd = torch.rsqrt(var + ctx.eps)  # (V, C)
            scale = invstd if weight is None else invstd * weight
            # dx = scale * (dy - sum(dy) / N - x_hat * sum(dy * x_hat) / N), in the statistics' dtype, centred first.
            offset = -scale * sums[:, :channels] / total
            slope = -scale * invstd * sums[:, channels:] / total
            shape = [1, channels] + [1] * (x.dim() - 2)
            grads = [
                torch.addcmul(offset[v].view(shape), view.to(mean.dtype) - mean[v].view(shape), slope[v].view(shape))
                .addcmul_(grad_view.to(mean.dtype), scale[v].view(shape))
                .to(x.dtype)
                for v, (view, grad_view) in enumerate(zip(views, grad_views))
            ]
            grad_input = grads[0] if num_views == 1 else torch.cat(grads)
        grad_weight = sum_dy_xhat.sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.sum(0) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None


def global_batch_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, num_views: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm in training mode over every process's batch, with exact gradients.

    Args:
        x: (N, C, *) on this process; N may differ between processes, and be 0. Any float dtype.
            With `num_views` V > 1, V views stacked along the batch, (V * n, C, *), view v in rows
            [v * n, (v + 1) * n): each view is normalised by the statistics of that view's rows on
            every process, as V separate calls would, in the same one collective each way.
        weight, bias: (C,) or None.
        eps: added to the variance.
        num_views: V.

    Returns:
        The normalised x (its shape and dtype); the global mean and biased variance, (C,) (V = 1) or
        (V, C); and each process's count of values per channel, (world_size,) (V = 1) or
        (world_size, V), on the device. Statistics and counts are fp32 (float64 for float64 input).
        One collective forward, one backward, no host read. Needs torch.distributed initialised.
    """
    if x.dim() < 2 or x.shape[1] == 0:
        raise ValueError(f"expected an (N, C, ...) input with C > 0, got shape {tuple(x.shape)}")
    if num_views < 1 or x.shape[0] % num_views:
        raise ValueError(f"{x.shape[0]} rows cannot hold {num_views} views of equal size")
    # The statistics and the backward's sums in fp32 whatever autocast does around the layer.
    with torch.autocast(device_type=x.device.type, enabled=False):
        output, mean, var, counts = _GlobalBatchNormFunction.apply(x, weight, bias, eps, num_views)
    if num_views == 1:
        return output, mean[0], var[0], counts[:, 0]
    return output, mean, var, counts


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
    # V views stacked along the batch, each normalised by its own statistics (set by
    # `view_batchnorm.views_in_batch` for the length of a forward); 1: a plain batch.
    views_in_batch: int = 1

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least a 2-d input (N, C, ...), got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Input (N, C, *), or with `views_in_batch` V > 1, V views (V * n, C, *) stacked along the
        batch, each normalised as if it came alone; output the same shape."""
        num_views = self.views_in_batch
        if num_views > 1 and (self.training or self.running_mean is None):
            if self.training and is_distributed():
                return self.forward_views(input, num_views)
            if input.shape[0] % num_views:
                raise ValueError(f"a batch of {num_views} stacked views needs a multiple of {num_views} rows")
            return torch.cat([self._forward_batch(view) for view in input.chunk(num_views)])
        return self._forward_batch(input)

    def _forward_batch(self, input: torch.Tensor) -> torch.Tensor:
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

    def forward_views(self, input: torch.Tensor, num_views: int) -> torch.Tensor:
        """Training under several processes, with `num_views` views stacked along the batch.

        Args:
            input: (V * n, C, *), view v in rows [v * n, (v + 1) * n) on every process.
            num_views: V.

        Returns:
            (V * n, C, *): each view normalised by the statistics of that view's rows on every
            process, and the running statistics updated once per view in order, exactly as V calls
            of `forward` leave them, but in one collective forward and one backward instead of V. On
            CUDA too (torch's SyncBatchNorm kernels normalise one batch at a time).
        """
        self._check_input_dim(input)
        output, mean, var, counts = global_batch_norm(input, self.weight, self.bias, self.eps, num_views)
        totals = counts.sum(0)  # (V,)
        if input.numel() // (input.shape[1] * num_views) < 2 and float(totals.min()) < 2:
            # Read only where the local rows alone cannot prove two values per view (see forward).
            raise ValueError("BatchNorm needs more than one value per channel of each view across all processes.")
        if self.track_running_stats:
            for view_mean, view_var, total in zip(mean, var, totals):
                self._update_running_stats(view_mean, view_var * total / (total - 1).clamp_min(1))
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
        # A tensor weight for the cumulative average (momentum None): no host read of the count. In the
        # buffers' dtype: fp32's 1/3 would be off by 1e-8 for float64 buffers.
        momentum = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype) if self.momentum is None else self.momentum
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
