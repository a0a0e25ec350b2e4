"""One forward for several views stacked along the batch, each view keeping its own BatchNorm statistics.

Barlow Twins normalises each view by its own batch statistics: the authors pass the network once per
view. Stacking the V views along the batch and running the network once is faster (larger matrix
products, one pass through Python and one collective per layer instead of V), but a BatchNorm would
then normalise by the statistics of all views mixed, which changes the method.

A model prepared once by :func:`enable_views_in_batch` runs as before, except inside
:func:`views_in_batch`: there every BatchNorm of the model (any `nn.modules.batchnorm._BatchNorm`:
BatchNorm1d/2d/3d, timm's BatchNormAct2d, `nn.SyncBatchNorm`, our `GlobalBatchNorm`) that uses batch
statistics takes its (V * B, C, *) input as V consecutive blocks of B rows, one per view, and runs its
own forward on each block in order, then concatenates the results:

* each view is normalised by its own mean and variance (and its own gradient flows back through
  them), exactly as V separate forwards do;
* the running statistics get V momentum updates, view by view, and `num_batches_tracked` counts V,
  as V forwards leave them (with `momentum=None` each update gets its own cumulative weight);
* a block of a (V * B, ...) tensor along dim 0 is contiguous (in channels-last too), so each block
  runs torch's fused kernels with no copy in; the concatenation is the one copy out, which
  torch.compile's inductor writes in place.

`GlobalBatchNorm` under several processes instead normalises all V views with one collective forward
and one backward (:meth:`GlobalBatchNorm.forward_views`), half the collectives of two forwards.

Layers without batch statistics (LayerNorm, GroupNorm, eval-mode BatchNorm with running statistics)
are untouched and need nothing. Layers that draw random numbers (dropout, drop-path) draw them once
for the stacked batch instead of once per view, so their masks differ from those of V forwards
(same distribution; they are off by default). Batch-statistics layers that are not `_BatchNorm`
subclasses (timm's EvoNorm-B, for instance) would mix the views: use V forwards with them.

Imports only torch and this package: copied into saved folders as remote code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import GlobalBatchNorm, is_distributed


__all__ = ["PerViewBatchNormForward", "enable_views_in_batch", "uses_batch_statistics", "views_in_batch"]


def uses_batch_statistics(layer: _BatchNorm) -> bool:
    """Whether `layer` normalises by the statistics of its input: torch's own rule (training, or
    no running statistics to use)."""
    return layer.training or (layer.running_mean is None and layer.running_var is None)


class PerViewBatchNormForward:
    """The forward installed on a BatchNorm instance by :func:`enable_views_in_batch`: the layer's
    own class forward, run once per view when `layer.views_in_batch` V > 1.

    Call: input (V * B, C, *), view v in rows [v * B, (v + 1) * B); returns (V * B, C, *), each
    view's rows as the class forward gives them for that view alone (its own batch statistics), in
    the input's memory format. The class forward runs V times in view order, so running statistics
    and `num_batches_tracked` move V times. With V = 1, or a layer that uses running statistics, it
    is the class forward itself.

    A picklable object rather than a closure: a model holding it deep-copies and pickles as usual.
    """

    def __init__(self, layer: _BatchNorm):
        self.layer = layer

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        layer, num_views = self.layer, self.layer.views_in_batch
        forward = type(layer).forward
        if num_views == 1 or not uses_batch_statistics(layer):
            return forward(layer, input)
        if input.shape[0] % num_views:
            raise ValueError(f"a batch of {num_views} stacked views needs a multiple of {num_views} rows, got {input.shape[0]}")
        return torch.cat([forward(layer, view) for view in input.chunk(num_views)])


def enable_views_in_batch(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of `model` able to take several views stacked along the batch; returns
    `model`. Until :func:`views_in_batch` says otherwise (`views_in_batch = 1`), nothing changes.

    Module types, parameters, buffers and state-dict keys stay as they are: each layer gets a
    `views_in_batch` attribute and a :class:`PerViewBatchNormForward` as its instance `forward`.
    `GlobalBatchNorm` reads `views_in_batch` in its own forward and needs no such forward. Idempotent.

    Called once, when the model is built: replacing `forward` inside a compiled forward does not
    survive torch.compile (dynamo replays the restore without the replacement), setting an int does.
    """
    for layer in model.modules():
        if not isinstance(layer, _BatchNorm) or isinstance(layer, GlobalBatchNorm):
            continue
        if not isinstance(layer.__dict__.get("forward"), PerViewBatchNormForward):
            if "forward" in layer.__dict__:
                raise ValueError(f"{type(layer).__name__} already has an instance forward; cannot take views in its batch.")
            layer.forward = PerViewBatchNormForward(layer)
        layer.views_in_batch = 1
    return model


@contextmanager
def views_in_batch(model: nn.Module, num_views: int) -> Iterator[None]:
    """Within this context, every BatchNorm of `model` treats its input as `num_views` views stacked
    along the batch: each view normalised by its own statistics, running statistics updated once per
    view in order (:class:`PerViewBatchNormForward`; `GlobalBatchNorm.forward_views` under several
    processes). Needs :func:`enable_views_in_batch` on `model` first (BatchNorms replaced since are
    enabled here, which compiled code should not rely on).

    Example:
        >>> model = enable_views_in_batch(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train())
        >>> view_1, view_2 = torch.randn(8, 4), torch.randn(8, 4)
        >>> with views_in_batch(model, 2):
        ...     stacked = model(torch.cat([view_1, view_2]))
        >>> torch.allclose(stacked[8:], model(view_2), atol=1e-6)
        True
    """
    layers = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    if not all(isinstance(layer.__dict__.get("forward"), PerViewBatchNormForward) or isinstance(layer, GlobalBatchNorm)
               for layer in layers):
        enable_views_in_batch(model)
    for layer in layers:
        layer.views_in_batch = num_views
    try:
        yield
    finally:
        for layer in layers:
            layer.views_in_batch = 1
