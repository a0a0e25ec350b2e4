"""The edges of `modeling_barlow.view_batchnorm` on single BatchNorm layers (test_views_in_batch.py
checks whole models against two forwards): which layers use batch statistics, layers that use
running statistics, batches that do not split into the views, and layers that already carry an
instance forward. Fast enough for mutation testing (benchmarks/mutation.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from modeling_barlow.view_batchnorm import enable_views_in_batch, uses_batch_statistics, views_in_batch


@pytest.mark.parametrize("training,mean_is_none,var_is_none", list(itertools.product([True, False], repeat=3)))
def test_uses_batch_statistics_is_torchs_rule(training, mean_is_none, var_is_none):
    layer = nn.BatchNorm1d(3).train(training)
    if mean_is_none:
        layer.running_mean = None
    if var_is_none:
        layer.running_var = None
    # torch's _BatchNorm.forward: batch statistics in training, or when neither running statistic exists.
    expected = training or (mean_is_none and var_is_none)
    assert uses_batch_statistics(layer) is expected


def test_eval_layer_without_running_statistics_takes_each_view_by_its_own_statistics():
    layer = nn.BatchNorm1d(3, track_running_stats=False).eval()
    model = enable_views_in_batch(nn.Sequential(layer))
    first, second = torch.randn(4, 3), 5 + 3 * torch.randn(4, 3)
    with views_in_batch(model, 2):
        got = model(torch.cat([first, second]))

    def normalised(x):  # the batch's own mean and biased variance, eps 1e-5
        return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)

    torch.testing.assert_close(got, torch.cat([normalised(first), normalised(second)]))


def test_layer_with_running_statistics_takes_the_whole_batch_at_once():
    # In eval mode the running statistics normalise every row alike: any number of rows is fine.
    layer = nn.BatchNorm1d(3).eval()
    layer.running_mean = torch.tensor([1.0, -2.0, 0.5])
    layer.running_var = torch.tensor([4.0, 0.25, 1.0])
    model = enable_views_in_batch(nn.Sequential(layer))
    x = torch.randn(5, 3)  # 5 rows: not two views of equal size
    with views_in_batch(model, 2):
        got = model(x)
    torch.testing.assert_close(got, (x - layer.running_mean) / torch.sqrt(layer.running_var + 1e-5))
    assert layer.num_batches_tracked.item() == 0


def test_rows_that_do_not_split_into_the_views_are_refused_with_the_count():
    model = enable_views_in_batch(nn.Sequential(nn.BatchNorm1d(3)).train())
    with views_in_batch(model, 2), pytest.raises(ValueError) as error:
        model(torch.randn(5, 3))
    assert str(error.value) == "a batch of 2 stacked views needs a multiple of 2 rows, got 5"


def test_a_layer_with_another_instance_forward_is_refused():
    layer = nn.BatchNorm1d(3)
    layer.forward = lambda x: x  # someone else's per-instance forward: not to be replaced silently
    with pytest.raises(ValueError) as error:
        enable_views_in_batch(nn.Sequential(layer))
    assert str(error.value) == "BatchNorm1d already has an instance forward; cannot take views in its batch."
