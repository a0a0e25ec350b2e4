"""Two gloo processes must give the loss and the DDP-averaged gradients of one process holding the
concatenated batch. The single-process side is computed independently, without torch.distributed."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from modeling_barlow import BarlowTwinsProjector, barlow_twins_loss, convert_to_global_batchnorm
from tests.ports import free_port


IN_FEATURES = 12


def _network(batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(1234)
    if batchnorm:  # the paper's projector: its BatchNorm must see the global batch too
        return convert_to_global_batchnorm(BarlowTwinsProjector(IN_FEATURES, [20, 24]))
    return torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 20), torch.nn.Tanh(), torch.nn.Linear(20, 24))


def _data(n: int):
    generator = torch.Generator().manual_seed(99)
    x1 = torch.randn(n, IN_FEATURES, generator=generator)
    x2 = x1 + 0.3 * torch.randn(n, IN_FEATURES, generator=generator)
    return x1, x2



CASES = [
    ([8, 8], "gram", False),  # global N = 16 < D = 24
    ([20, 20], "direct", False),  # global N = 40 > D
    ([5, 11], "gram", False),  # uneven batches: the gathered rows are zero-padded
    ([8, 8], "auto", False),
    ([8, 8], "gram", True),  # GlobalBatchNorm in the network
    ([6, 10], "direct", True),
]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case, (splits, path, batchnorm) in enumerate(CASES):  # one spawn for all: start-up dominates
            x1, x2 = _data(sum(splits))
            start = sum(splits[:rank])
            rows = slice(start, start + splits[rank])
            network = _network(batchnorm)
            model = DistributedDataParallel(network)
            out = barlow_twins_loss(model(x1[rows]), model(x2[rows]), path=path)
            out.loss.backward()  # DDP averages the gradients over the two processes
            grads = [p.grad.clone() for p in model.parameters()]
            buffers = [b.clone() for b in network.buffers()]
            result = {"loss": out.loss.detach(), "off": out.off_diagonal.detach(), "grads": grads, "buffers": buffers}
            torch.save(result, os.path.join(out_dir, f"case{case}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{s[0]}+{s[1]}-{p}{'-bn' * b}" for s, p, b in CASES])
def test_two_processes_match_one_process_on_the_whole_batch(two_process_results, case):
    splits, _, batchnorm = CASES[case]
    x1, x2 = _data(sum(splits))
    model = _network(batchnorm)  # on one process GlobalBatchNorm is plain BatchNorm
    single = barlow_twins_loss(model(x1), model(x2), path="direct")
    single.loss.backward()

    for rank in range(2):
        result = torch.load(two_process_results / f"case{case}_rank{rank}.pt")
        torch.testing.assert_close(result["loss"], single.loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["off"], single.off_diagonal.detach(), rtol=1e-5, atol=1e-4)
        for got, param in zip(result["grads"], model.parameters()):
            torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)
        for got, buffer in zip(result["buffers"], model.buffers()):  # running statistics
            torch.testing.assert_close(got, buffer, rtol=1e-5, atol=1e-6)
