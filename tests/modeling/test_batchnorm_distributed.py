"""GlobalBatchNorm across two gloo processes: equal to torch's BatchNorm on one process holding the
whole batch (outputs, loss, gradients, running statistics; convolutions, uneven and empty shares,
bf16 autocast), in one collective per layer each way and without reading anything back."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_barlow import GlobalBatchNorm, barlow_twins_loss, convert_to_global_batchnorm
from tests.ports import free_port


def _network(momentum: float | None = 0.1) -> nn.Module:
    """Convolutions with BatchNorm2d, a projector with BatchNorm1d. No bias before a normalisation
    (its true gradient is zero, and what is computed is rounding noise), but the first layer's:
    fixed at 40, so that its outputs sit far from zero, where E[x^2] - E[x]^2 would cancel."""
    torch.manual_seed(4321)
    network = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=momentum), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 12, bias=False), nn.BatchNorm1d(12, momentum=momentum), nn.ReLU(), nn.Linear(12, 16, bias=False),
    )
    with torch.no_grad():
        network[0].bias.fill_(40.0)
    network[0].bias.requires_grad_(False)
    return network


def _views(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x1 = torch.randn(n, 3, 9, 9, generator=generator)
    return x1, x1 + 0.3 * torch.randn(n, 3, 9, 9, generator=generator)


CASES = [  # (rows per process, BatchNorm momentum, autocast to bf16)
    ([4, 4], 0.1, False),
    ([3, 6], 0.1, False),  # uneven shares
    ([0, 7], 0.1, False),  # one process without images
    ([5, 3], None, False),  # cumulative running averages
    ([4, 4], 0.1, True),
]
CASE_IDS = [f"{a}+{b}{'-cumulative' if m is None else ''}{'-bf16' if bf16 else ''}" for (a, b), m, bf16 in CASES]


def _step(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = barlow_twins_loss(model(x1), model(x2))
    out.loss.backward()
    return out.loss.detach()


class _Counter(TorchDispatchMode):
    """Collectives issued (functional or not) and values read back to the host."""

    def __init__(self):
        super().__init__()
        self.collectives = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.namespace, func.__name__.split(".")[0]
        if namespace in ("_c10d_functional", "c10d") and name not in ("wait_tensor", "_wrap_tensor_autograd"):
            self.collectives += 1
        if name in ("_local_scalar_dense", "nonzero"):
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


class _ToList(TorchFunctionMode):
    """tolist() of a CPU tensor reads memory without a dispatched op; counted here."""

    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "tolist":
            self.counter.host_reads += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> dict:
    counter = _Counter()
    with _ToList(counter), counter:
        fn()
    return {"collectives": counter.collectives, "host_reads": counter.host_reads}


def _counts_of_one_layer_and_the_loss() -> dict:
    layer = convert_to_global_batchnorm(nn.BatchNorm2d(6)).train()
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    out = {}
    out["forward"] = _count(lambda: out.setdefault("y", layer(x)))
    out["backward"] = _count(lambda: out["y"].square().sum().backward())
    z1, z2 = (torch.randn(6, 32, requires_grad=True) for _ in range(2))
    out["loss_forward"] = _count(lambda: out.setdefault("loss", barlow_twins_loss(z1, z2, path="gram").loss))
    out["loss_backward"] = _count(lambda: out["loss"].backward())
    return {k: v for k, v in out.items() if isinstance(v, dict)}



def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case, (splits, momentum, bf16) in enumerate(CASES):  # one spawn for all: start-up dominates
            x1, x2 = _views(sum(splits))
            rows = slice(sum(splits[:rank]), sum(splits[: rank + 1]))
            network = convert_to_global_batchnorm(_network(momentum))
            model = DistributedDataParallel(network)
            losses = [_step(model, x1[rows], x2[rows], bf16) for _ in range(2)]  # running statistics move twice
            result = {
                "losses": losses,
                "grads": [p.grad.clone() for p in network.parameters() if p.requires_grad],  # DDP-averaged, both steps
                "buffers": [b.clone() for b in network.buffers()],
            }
            torch.save(result, os.path.join(out_dir, f"case{case}_rank{rank}.pt"))
        torch.save(_counts_of_one_layer_and_the_loss(), os.path.join(out_dir, f"counts_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("global_bn")
    mp.spawn(_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_two_processes_match_torch_batchnorm_on_the_whole_batch(two_process_results, case):
    splits, momentum, bf16 = CASES[case]
    x1, x2 = _views(sum(splits))
    model = _network(momentum)  # torch's own BatchNorm, one process, the concatenated batch
    losses = [_step(model, x1, x2, bf16) for _ in range(2)]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for rank in range(2):
        result = torch.load(two_process_results / f"case{case}_rank{rank}.pt")
        for got, expected in zip(result["losses"], losses, strict=True):
            _assert_close(got, expected, bf16)
        for got, expected in zip(result["grads"], grads, strict=True):
            _assert_close(got, expected, bf16)
        for got, expected in zip(result["buffers"], model.buffers(), strict=True):
            _assert_close(got.to(expected.dtype), expected, bf16)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, bf16: bool) -> None:
    # Relative to the tensor's largest entry, since small entries carry the same absolute rounding
    # as large ones. fp32: each side is within 4.2e-5 of it from an fp64 computation (measured). bf16:
    # the two sides round different intermediate values to 8 bits of mantissa (1.6e-2 measured).
    rtol = 3e-2 if bf16 else 1e-4
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.slow
def test_one_collective_per_layer_each_way_and_no_host_read(two_process_results):
    for rank in range(2):
        counts = torch.load(two_process_results / f"counts_rank{rank}.pt")
        # The old layer took an all_reduce of the count and a read of it, then two all_reduces
        # (mean, variance) each way.
        assert counts["forward"] == {"collectives": 1, "host_reads": 0}
        assert counts["backward"] == {"collectives": 1, "host_reads": 0}
        # The loss (Gram path): the two views' moments with the batch sizes (read once), the two
        # views' rows in one gather, the Frobenius sum; backward, each of the three once.
        assert counts["loss_forward"] == {"collectives": 3, "host_reads": 1}
        assert counts["loss_backward"] == {"collectives": 3, "host_reads": 0}


def _no_tf32() -> None:
    """fp32 convolutions and products: TF32's 10-bit mantissa would swamp the comparison."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def _cuda_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    _no_tf32()
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        x1, x2 = _views(8)
        rows = slice(4 * rank, 4 * rank + 4)
        for torch_kernels in (True, False):
            GlobalBatchNorm.use_torch_kernels_on_cuda = torch_kernels
            network = convert_to_global_batchnorm(_network()).cuda()
            model = DistributedDataParallel(network, device_ids=[rank])
            loss = _step(model, x1[rows].cuda(), x2[rows].cuda(), False)
            result = {"loss": loss.cpu(), "grads": [p.grad.cpu() for p in network.parameters() if p.requires_grad],
                      "buffers": [b.cpu() for b in network.buffers()]}
            torch.save(result, os.path.join(out_dir, f"cuda_{torch_kernels}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_paths_match_torch_batchnorm_on_the_whole_batch(tmp_path, monkeypatch):
    # torch's SyncBatchNorm kernels (the default on CUDA) and the collective path without host reads.
    for backend in (torch.backends.cudnn, torch.backends.cuda.matmul):
        monkeypatch.setattr(backend, "allow_tf32", False)
    mp.spawn(_cuda_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    x1, x2 = _views(8)
    model = _network().cuda()
    loss = _step(model, x1.cuda(), x2.cuda(), False)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for torch_kernels in (True, False):
        for rank in range(2):
            result = torch.load(tmp_path / f"cuda_{torch_kernels}_rank{rank}.pt")
            _assert_close(result["loss"], loss.cpu(), False)
            for got, expected in zip(result["grads"], grads, strict=True):
                _assert_close(got, expected.cpu(), False)
            for got, expected in zip(result["buffers"], model.buffers(), strict=True):
                _assert_close(got.to(expected.dtype), expected.cpu(), False)
