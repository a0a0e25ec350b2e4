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
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


__all__ = ["BarlowTwinsLossOutput", "barlow_twins_loss"]

LossPath = Literal["auto", "gram", "direct"]


@dataclass
class BarlowTwinsLossOutput:
    """Result of :func:`barlow_twins_loss`; every field is an fp32 scalar tensor.

    Attributes:
        loss: ``loss_scale * (on_diagonal + off_diagonal_weight * off_diagonal)``.
        on_diagonal: ``sum_i (1 - C_ii)^2``, unweighted.
        off_diagonal: ``sum_{i != j} C_ij^2``, unweighted.
    """

    loss: torch.Tensor
    on_diagonal: torch.Tensor
    off_diagonal: torch.Tensor


def _world() -> tuple[bool, object]:
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed, (dist.group.WORLD if distributed else None)


def _sum_all(x: torch.Tensor, distributed: bool, group: object) -> torch.Tensor:
    """Sum over processes; its backward sums the gradients over processes too."""
    return funcol.all_reduce(x, "sum", group) if distributed else x


def _global_batch_size(local: int, distributed: bool, device: torch.device) -> int:
    if not distributed:
        return local
    size = torch.tensor([local], device=device, dtype=torch.long)
    dist.all_reduce(size)
    return int(size.item())


def _standardise(z: torch.Tensor, n: int, eps: float, distributed: bool, group: object) -> torch.Tensor:
    """Zero mean, unit (biased) variance per dimension over the global batch: BatchNorm1d without
    affine, in training mode, as the release applies it to each view on its own."""
    mean = _sum_all(z.sum(0), distributed, group) / n
    centred = z - mean
    var = _sum_all(centred.square().sum(0), distributed, group) / n
    return centred * torch.rsqrt(var + eps)


def _gather_rows(x: torch.Tensor, distributed: bool, group: object) -> torch.Tensor:
    """All processes' rows of ``x``. Shorter batches are zero-padded: a zero row of a standardised
    view adds nothing to a Gram product, so the padding needs no removal."""
    if not distributed:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    longest = int(max(s.item() for s in sizes))
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], x.shape[1])])
    return funcol.all_gather_single_autograd(x, 0, group)


def _sums_direct(a: torch.Tensor, b: torch.Tensor, n: int, distributed: bool, group: object):
    c = _sum_all(a.T @ b, distributed, group) / n
    diagonal = torch.diagonal(c)
    # fp64 accumulation: for D = 8192 the two sums are large and nearly cancel near convergence.
    return diagonal, c.square().sum(dtype=torch.float64)


def _sums_gram(a: torch.Tensor, b: torch.Tensor, n: int, distributed: bool, group: object):
    diagonal = _sum_all((a * b).sum(0), distributed, group) / n
    # Each process computes only its own rows of the N x N Gram products.
    gram_a = a @ _gather_rows(a, distributed, group).T
    gram_b = b @ _gather_rows(b, distributed, group).T
    frobenius = _sum_all((gram_a * gram_b).sum(dtype=torch.float64), distributed, group) / (n * n)
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
    distributed, group = _world()
    n = _global_batch_size(z1.shape[0], distributed, z1.device)
    if n < 2:
        raise ValueError(
            f"The Barlow Twins loss standardises each dimension over the batch, which needs at least two "
            f"samples; got a global batch of {n}. Increase the batch size."
        )
    dim = z1.shape[1]
    # fp32 whatever the autocast context: low-precision C has led to NaN after loss spikes.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = _standardise(z1.float(), n, eps, distributed, group)
        b = _standardise(z2.float(), n, eps, distributed, group)
        use_gram = path == "gram" or (path == "auto" and n < dim)
        sums = _sums_gram if use_gram else _sums_direct
        diagonal, frobenius = sums(a, b, n, distributed, group)
        on_diagonal = (1.0 - diagonal).square().sum()
        off_diagonal = (frobenius - diagonal.double().square().sum()).float()
        loss = loss_scale * (on_diagonal + off_diagonal_weight * off_diagonal)
    return BarlowTwinsLossOutput(loss=loss, on_diagonal=on_diagonal, off_diagonal=off_diagonal)
