"""GlobalBatchNorm and the collective helpers on two ranks in ONE process: torch's threaded process
group (the one torch's own MultiThreadedTestCase uses) runs each rank in a thread, so the
multi-process code runs with a world size of 2 in process, where mutation testing can follow it
(tests/modeling/test_batchnorm_distributed.py runs real processes, in subprocesses it cannot).

Reference: torch's BatchNorm on the two ranks' rows concatenated: its output rows, the input's
gradient and the running statistics must be what each rank gets. The ranks' batches have different
means, so the between-rank term of the merged variance shows."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
from torch import nn

import modeling_barlow.distributed as distributed
from modeling_barlow import convert_to_global_batchnorm
from modeling_barlow.view_batchnorm import views_in_batch

threaded_pg = pytest.importorskip("torch.testing._internal.distributed.multi_threaded_pg")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def on_two_ranks(work):
    """work(rank) on ranks 0 and 1 of a threaded process group; returns [result of rank 0, of rank 1]."""
    assert not dist.is_initialized()
    threaded_pg._install_threaded_pg()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    store, results = dist.HashStore(), [None, None]

    def run(rank):
        try:
            dist.init_process_group("threaded", rank=rank, world_size=2, store=store)
            try:
                results[rank] = work(rank)
            finally:
                dist.destroy_process_group()
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        threaded_pg._uninstall_threaded_pg()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def test_two_ranks_are_distributed_and_sum_and_gather():
    def work(rank):
        rows = torch.full((3 - rank, 2), float(rank + 1))  # 3 rows on rank 0, 2 on rank 1
        gathered = distributed.gather_rows(rows, [3, 2])
        total = distributed.sum_across_processes(torch.tensor([1.0 + rank]))
        return distributed.is_distributed(), gathered.clone(), total.clone()

    # Rank 1's two rows are padded with a zero row to the longest batch, 3.
    expected = torch.tensor([[1.0, 1], [1, 1], [1, 1], [2, 2], [2, 2], [0, 0]])
    for is_distributed, gathered, total in on_two_ranks(work):
        assert is_distributed
        torch.testing.assert_close(gathered, expected)
        torch.testing.assert_close(total, torch.tensor([3.0]))


def _batches(rows, channels=3, shape=()):
    """Each rank's batch, with its own mean and spread."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, channels, *shape, generator=generator, dtype=torch.float64) * (1 + 2 * rank) + 3 * rank
            for rank, n in enumerate(rows)]


def _reference(batches, views=1):
    """torch's BatchNorm in training on the ranks' rows of each view concatenated: (output rows of
    each rank, the input gradient's rows of each rank, running mean, running var)."""
    layer = nn.BatchNorm1d(batches[0].shape[1], momentum=0.3).double().train()
    per_view = [[b.unflatten(0, (views, -1))[v] for b in batches] for v in range(views)]
    inputs = [torch.cat(view).requires_grad_() for view in per_view]
    outputs = [layer(x) for x in inputs]
    sum(((o * torch.arange(o.numel(), dtype=o.dtype).view(o.shape).cos()).sum() for o in outputs)).backward()
    sizes = [b.shape[0] // views for b in batches]
    ranks_out, ranks_grad = [], []
    for rank in range(len(batches)):
        start = sum(sizes[:rank])
        ranks_out.append(torch.cat([o[start:start + sizes[rank]] for o in outputs]))
        ranks_grad.append(torch.cat([x.grad[start:start + sizes[rank]] for x in inputs]))
    return ranks_out, ranks_grad, layer.running_mean, layer.running_var


def _global(batches, views=1):
    def work(rank):
        layer = convert_to_global_batchnorm(nn.BatchNorm1d(batches[0].shape[1], momentum=0.3)).double().train()
        x = batches[rank].clone().requires_grad_()
        if views == 1:
            out = layer(x)
        else:
            with views_in_batch(nn.Sequential(layer), views):
                out = layer(x)
        # The same weights on every row as the reference: rank r's rows of each view.
        offset = [0, batches[0].shape[0] // views][rank]
        total = sum(b.shape[0] for b in batches) // views
        weights = torch.cat([torch.arange(total * 3, dtype=out.dtype).view(total, 3).cos()[offset:offset + x.shape[0] // views]
                             for _ in range(views)])
        (out * weights).sum().backward()
        return out.detach(), x.grad, layer.running_mean.clone(), layer.running_var.clone()

    return on_two_ranks(work)


@pytest.mark.parametrize("rows", [(5, 3), (1, 1)], ids=["5 and 3 rows", "one row each"])
def test_each_rank_gets_torchs_batchnorm_of_both_ranks_rows(rows):
    # One row on each rank: the local batch alone cannot normalise, the two together can.
    batches = _batches(rows)
    outputs, grads, running_mean, running_var = _reference(batches)
    for rank, (out, grad, mean, var) in enumerate(_global(batches)):
        torch.testing.assert_close(out, outputs[rank])
        torch.testing.assert_close(grad, grads[rank])
        torch.testing.assert_close(mean, running_mean)
        torch.testing.assert_close(var, running_var)


@pytest.mark.parametrize("rows", [(6, 4), (2, 2)], ids=["3 and 2 rows a view", "one row a view each"])
def test_two_views_each_get_torchs_batchnorm_of_that_views_rows(rows):
    batches = _batches(rows)
    outputs, grads, running_mean, running_var = _reference(batches, views=2)
    for rank, (out, grad, mean, var) in enumerate(_global(batches, views=2)):
        torch.testing.assert_close(out, outputs[rank])
        torch.testing.assert_close(grad, grads[rank])
        torch.testing.assert_close(mean, running_mean)  # moved once per view, in order
        torch.testing.assert_close(var, running_var)
