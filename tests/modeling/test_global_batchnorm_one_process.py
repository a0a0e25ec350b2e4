"""GlobalBatchNorm's multi-process code run in process, by a one-process gloo group with
is_distributed() answering yes: its statistics, running buffers, gradients and stacked views must be
torch's BatchNorm exactly. (tests/modeling/test_batchnorm_distributed.py runs it on two processes,
in subprocesses that mutation testing cannot follow.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modeling_barlow.distributed as distributed
from modeling_barlow import GlobalBatchNorm, convert_to_global_batchnorm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    assert not distributed.is_distributed()  # one process is not "distributed": the tests pretend it is
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    yield
    dist.destroy_process_group()


def _pair(reference: nn.Module) -> tuple[nn.Module, nn.Module]:
    return reference, convert_to_global_batchnorm(copy.deepcopy(reference))


@pytest.mark.parametrize("shape, cls, kwargs", [
    ((12, 5), nn.BatchNorm1d, {}),
    ((6, 4, 3, 3), nn.BatchNorm2d, {"momentum": None}),
    ((6, 4, 3, 3), nn.BatchNorm2d, {"affine": False, "momentum": 0.3}),
    ((7, 3), nn.BatchNorm1d, {"track_running_stats": False}),
])
def test_training_steps_match_torch_batchnorm(one_process_group, shape, cls, kwargs):
    reference, ours = _pair(cls(shape[1], eps=0.01, **kwargs).double())
    assert type(ours) is GlobalBatchNorm
    if reference.affine:
        with torch.no_grad():
            for module in (reference, ours):
                module.weight.copy_(torch.linspace(0.5, 2, shape[1]))
                module.bias.copy_(torch.linspace(-1, 1, shape[1]))
    for step in range(3):
        x = (torch.randn(*shape, dtype=torch.float64) * (step + 1) + step).requires_grad_(True)
        x_ours = x.detach().clone().requires_grad_(True)
        out, got = reference.train()(x), ours.train()(x_ours)
        torch.testing.assert_close(got, out)
        upstream = torch.randn_like(out)
        expected = torch.autograd.grad(out, [x, *reference.parameters()], upstream)
        grads = torch.autograd.grad(got, [x_ours, *ours.parameters()], upstream)
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b)
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, msg=name)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_stacked_views_are_normalised_each_on_its_own(one_process_group):
    reference, ours = _pair(nn.BatchNorm2d(3, momentum=0.2).double())
    with torch.no_grad():
        for module in (reference, ours):
            module.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            module.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    ours.views_in_batch = 2
    first, second = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64) * 3 + 1
    got = ours.train()(torch.cat([first, second]))
    expected = torch.cat([reference.train()(first), reference(second)])  # two calls, in order
    torch.testing.assert_close(got, expected)
    for name, buffer in reference.named_buffers():  # updated once per view, in order
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, msg=name)
    with pytest.raises(ValueError, match="^BatchNorm needs more than one value per channel of each view"):
        ours(torch.randn(2, 3, dtype=torch.float64).view(2, 3, 1, 1))
    # Views of two values per channel: each one's running variance is unbiased (a divisor of 1).
    reference, ours = _pair(nn.BatchNorm1d(3, momentum=1.0).double())
    ours.views_in_batch = 2
    first, second = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64) * 2
    ours.train()(torch.cat([first, second])), reference.train()(first), reference(second)
    torch.testing.assert_close(ours.running_var, second.var(0, unbiased=True))
    torch.testing.assert_close(ours.running_var, reference.running_var)


def test_one_value_per_channel_is_refused_and_inputs_must_be_batches(one_process_group):
    norm = GlobalBatchNorm(3).train()
    with pytest.raises(ValueError, match="^BatchNorm needs more than one value per channel across all processes.$"):
        norm(torch.randn(1, 3))
    assert norm(torch.randn(1, 3, 2, 1)).shape == (1, 3, 2, 1)  # two values per channel: enough
    # Two values: the running variance is their unbiased variance (a divisor of 1, not 2).
    reference, ours = _pair(nn.BatchNorm1d(3, momentum=1.0).double())
    x = torch.randn(2, 3, dtype=torch.float64)
    reference.train()(x), ours.train()(x)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    torch.testing.assert_close(ours.running_var, x.var(0, unbiased=True))
    with pytest.raises(ValueError, match="^expected at least a 2-d input \\(N, C, ...\\), got 1-d$"):
        norm(torch.randn(3))


def test_global_batch_norm_returns_the_statistics_and_counts(one_process_group):
    x = torch.randn(5, 2, 3, dtype=torch.float64) * 2 + 1
    output, mean, var, counts = distributed.global_batch_norm(x, None, None, 1e-5)
    torch.testing.assert_close(mean, x.mean((0, 2)))
    torch.testing.assert_close(var, x.var((0, 2), unbiased=False))
    assert counts.tolist() == [15] and mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(output, nn.functional.batch_norm(x, None, None, training=True, eps=1e-5))
    _, means, variances, view_counts = distributed.global_batch_norm(x[:4], None, None, 1e-5, num_views=2)
    torch.testing.assert_close(means, torch.stack([x[:2].mean((0, 2)), x[2:4].mean((0, 2))]))
    torch.testing.assert_close(variances[1], x[2:4].var((0, 2), unbiased=False))
    assert view_counts.tolist() == [[6, 6]]
    for bad, message in ((torch.randn(4), "expected an \\(N, C, ...\\) input with C > 0, got shape \\(4,\\)"),
                         (torch.randn(4, 0), "C > 0, got shape \\(4, 0\\)")):
        with pytest.raises(ValueError, match=message):
            distributed.global_batch_norm(bad, None, None, 1e-5)
    with pytest.raises(ValueError, match="^5 rows cannot hold 2 views of equal size$"):
        distributed.global_batch_norm(x, None, None, 1e-5, num_views=2)


def test_gathered_rows_are_padded_to_the_longest_batch(one_process_group):
    x = torch.randn(3, 8)
    torch.testing.assert_close(distributed.gather_rows(x, [3]), x)
    padded = distributed.gather_rows(x, [5])  # another process holding 5 rows: ours padded with zeros
    assert padded.shape == (5, 8)
    torch.testing.assert_close(padded[:3], x)
    assert not padded[3:].any()
    torch.testing.assert_close(distributed.sum_across_processes(x), x)


def test_low_precision_inputs_get_fp32_statistics(one_process_group):
    x = (torch.randn(8, 3, dtype=torch.float64) * 3 + 100).to(torch.bfloat16)
    output, mean, var, _ = distributed.global_batch_norm(x, None, None, 1e-5)
    assert output.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    wide = x.float()
    torch.testing.assert_close(mean, wide.mean(0))
    torch.testing.assert_close(var, wide.var(0, unbiased=False), rtol=1e-4, atol=1e-4)


def test_stacked_views_on_one_process_without_a_group():
    # Not distributed: each view through torch's BatchNorm in turn (training, or eval without running stats).
    reference, ours = _pair(nn.BatchNorm1d(3, momentum=0.5).double())
    ours.views_in_batch = 2
    first, second = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64) + 2
    torch.testing.assert_close(ours.train()(torch.cat([first, second])),
                               torch.cat([reference.train()(first), reference(second)]))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    # In eval mode with running statistics, the stacked batch is one batch for them.
    both = torch.cat([first, second])
    torch.testing.assert_close(ours.eval()(both), reference.eval()(both))
    stateless = GlobalBatchNorm(3, track_running_stats=False).double().eval()
    stateless.views_in_batch = 2
    torch.testing.assert_close(stateless(both), torch.cat([
        nn.functional.batch_norm(view, None, None, stateless.weight, stateless.bias, True, 0.0, stateless.eps)
        for view in (first, second)]))
    with pytest.raises(ValueError, match="^a batch of 2 stacked views needs a multiple of 2 rows$"):
        ours.train()(torch.randn(5, 3, dtype=torch.float64))
