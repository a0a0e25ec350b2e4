"""The Barlow Twins objective, exact on one process or many.

For two views ``z1, z2`` of shape (N, D), each is standardised over the (global) batch, and

    C = a^T b / N                                  (D x D cross-correlation)
    loss = loss_scale * (sum_i (1 - C_ii)^2 + off_diagonal_weight * sum_{i != j} C_ij^2)

Two exact ways to get the two sums:

* **direct**: form C (N D^2 flops, a D x D tensor); cheaper when N >= D.
* **Gram**: never form C. With Gram matrices ``A = a a^T`` and ``B = b b^T`` (N x N),
  ``||C||_F^2 = sum(A * B) / N^2`` and ``diag(C) = sum_n a * b / N`` (N^2 D flops); cheaper
  when N < D, which is the usual case (D = 8192, N = 256 per batch).

In both, the off-diagonal sum is ``||C||_F^2 - sum(diag(C)^2)``: no D x D mask or copy.

With ``torch.distributed`` initialised, the batch statistics, C and the Gram sums are global,
through reductions that carry gradients (``_functional_collectives``). Every process then computes
the same loss, and after DDP averages gradients the update equals that of one process holding
the whole batch. (The authors' release all-reduces C with a plain ``all_reduce`` outside
autograd, which leaves the step ``1 / world_size`` of the true gradient.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .distributed import gather_rows, global_batch_norm, is_distributed, sum_across_processes


__all__ = ["BarlowTwinsLossOutput", "barlow_twins_loss", "cross_correlation"]

LossPath = Literal["auto", "gram", "direct"]


@dataclass
class BarlowTwinsLossOutput:
    """Result of :func:`barlow_twins_loss`; every field is an fp32 scalar tensor.

    Attributes:
        loss: ``loss_scale * (on_diagonal + off_diagonal_weight * off_diagonal)``.
        on_diagonal: ``sum_i (1 - C_ii)^2``, unweighted.
        off_diagonal: ``sum_{i != j} C_ij^2``, unweighted.
        diagonal_mean: ``mean_i C_ii``, detached: how well the views agree, 1 at the optimum.
    """

    loss: torch.Tensor
    on_diagonal: torch.Tensor
    off_diagonal: torch.Tensor
    diagonal_mean: torch.Tensor


def _standardise(z1: torch.Tensor, z2: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each view at zero mean and unit (biased) variance per dimension over the global batch:
    BatchNorm1d without affine, in training mode, as the release applies it to each view on its
    own. Also returns every process's batch size (one host read, for the whole loss)."""
    if not is_distributed():
        # The local batch is the global one: BatchNorm's fused kernels compute the same statistics
        # (biased variance, eps inside the root), with no collective.
        a, b = (F.batch_norm(z, None, None, training=True, eps=eps) for z in (z1, z2))
        return a, b, [z1.shape[0]]
    # Side by side, each view's dimensions are channels of their own: both views' statistics, and
    # every process's batch size, in one collective (and one host read, here, for the whole loss).
    both, _, _, counts = global_batch_norm(torch.cat([z1, z2], dim=1), None, None, eps)
    a, b = both.split(z1.shape[1], dim=1)
    return a, b, [int(c) for c in counts.tolist()]


def _sums_direct(a: torch.Tensor, b: torch.Tensor, n: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # N C, not C: dividing the diagonal and the sum instead saves a D x D pass forward and backward.
    nc = sum_across_processes(a.T @ b)
    diagonal = torch.diagonal(nc) / n
    # fp64 accumulation: for D = 8192 the two sums are large and nearly cancel near convergence.
    return diagonal, nc.square().sum(dtype=torch.float64) / (n * n)


class _GramFrobenius(torch.autograd.Function):
    """``sum((a a^T) * (b b^T))`` in fp64 for (N, D) views held whole by one process.

    Both Gram matrices are symmetric, so the gradients are ``2 (b b^T) a`` and ``2 (a a^T) b``:
    two (N, N) x (N, D) products, where autograd through ``a @ a.T`` takes two per view (one for
    each place ``a`` appears) and sums them."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        gram_a, gram_b = a @ a.T, b @ b.T
        ctx.save_for_backward(a, b, gram_a, gram_b)
        return (gram_a * gram_b).sum(dtype=torch.float64)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b, gram_a, gram_b = ctx.saved_tensors
        scale = 2.0 * grad.to(a.dtype)
        grad_a = (gram_b * scale) @ a if ctx.needs_input_grad[0] else None
        grad_b = (gram_a * scale) @ b if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _sums_gram(a: torch.Tensor, b: torch.Tensor, n: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if not is_distributed():
        return (a * b).sum(0) / n, _GramFrobenius.apply(a, b) / (n * n)
    # Each process computes only its own rows of the N x N Gram products; gathered rows are
    # zero-padded for uneven batches, and a zero row adds nothing to a Gram product or a diagonal.
    # Both views come in one gather, and the diagonal of C from the gathered rows, with no sum.
    dim = a.shape[1]
    rows = gather_rows(torch.cat([a, b], dim=1), sizes)
    all_a, all_b = rows[:, :dim], rows[:, dim:]
    diagonal = (all_a * all_b).sum(0) / n
    frobenius = sum_across_processes(((a @ all_a.T) * (b @ all_b.T)).sum(dtype=torch.float64)) / (n * n)
    return diagonal, frobenius


def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    off_diagonal_weight: float = 0.0051,
    loss_scale: float = 1.0,
    *,
    eps: float = 1e-5,
    path: LossPath = "auto",
) -> BarlowTwinsLossOutput:
    """Barlow Twins loss of two batches of embeddings.

    Args:
        z1: projections of the first view, shape (N, D), any float dtype.
        z2: projections of the second view, shape (N, D).
        off_diagonal_weight: the paper's lambda (the release uses 0.0051).
        loss_scale: multiplies the whole loss (the first release used 0.024, i.e. 196 / D, for D = 8192).
        eps: added to the variance, as BatchNorm1d does.
        path: ``"gram"``, ``"direct"`` or ``"auto"`` (Gram when the global N is below D).

    Returns:
        A :class:`BarlowTwinsLossOutput` of fp32 scalars, equal on every process.

    Example:
        >>> z1, z2 = torch.randn(32, 128), torch.randn(32, 128)
        >>> out = barlow_twins_loss(z1, z2)
        >>> out.loss.shape, out.loss.dtype
        (torch.Size([]), torch.float32)
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D) with the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    if path not in ("auto", "gram", "direct"):
        raise ValueError(f"path must be 'auto', 'gram' or 'direct', got {path!r}.")
    if not is_distributed():
        _require_two_samples(z1.shape[0])
    dim = z1.shape[1]
    # fp32 whatever the autocast context: low-precision C has led to NaN after loss spikes.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, b, sizes = _standardise(z1.float(), z2.float(), eps)
        n = sum(sizes)
        _require_two_samples(n)  # every process has the same sizes: all raise together
        use_gram = path == "gram" or (path == "auto" and n < dim)
        sums = _sums_gram if use_gram else _sums_direct
        diagonal, frobenius = sums(a, b, n, sizes)
        on_diagonal = (1.0 - diagonal).square().sum()
        off_diagonal = (frobenius - diagonal.double().square().sum()).float()
        loss = loss_scale * (on_diagonal + off_diagonal_weight * off_diagonal)
    return BarlowTwinsLossOutput(
        loss=loss, on_diagonal=on_diagonal, off_diagonal=off_diagonal, diagonal_mean=diagonal.detach().mean()
    )


def _require_two_samples(n: int) -> None:
    if n < 2:
        raise ValueError(
            f"The Barlow Twins loss standardises each dimension over the batch, which needs at least two "
            f"samples; got a global batch of {n}. Increase the batch size."
        )


@torch.no_grad()
def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The D x D cross-correlation matrix C of two views (N, D), for inspection and plots: the
    loss pushes it to the identity. Global across processes like the loss; fp32; no gradient."""
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, b, sizes = _standardise(z1.float(), z2.float(), eps)
        return sum_across_processes(a.T @ b) / sum(sizes)
