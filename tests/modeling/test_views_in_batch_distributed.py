"""Both views in one forward across two gloo processes (issue #32).

Each process holds its rows of both views; the model runs as barlow-pretrain runs it under torchrun
(GlobalBatchNorm, DDP). The reference is one process holding the whole batch, with plain BatchNorm
and one forward per view (`two_forwards`, independent of the model's forward). Compared in float64
after two steps: each process's projections, the loss, every DDP-averaged gradient and every buffer.

Then the collectives of one step, counted as they are issued (any c10d or functional collective):
one per BatchNorm layer each way for both views, where one forward per view took one per layer per
view, plus the loss's three each way.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modeling_barlow import convert_to_global_batchnorm
from tests.ports import free_port

from .test_batchnorm_distributed import _count
from .test_views_in_batch import MODELS, assert_exact, assert_same_state, build, two_forwards, views


# (model, rows per process, BatchNorm momentum)
CASES = [(name, [4, 4], 0.1) for name in MODELS] + [("resnet-small-stem", [3, 5], None)]
CASE_IDS = [f"{name}-{a}+{b}{'-cumulative' if m is None else ''}" for name, (a, b), m in CASES]
STEPS = 2
# The loss is fp32 whatever its input (loss.py), and its Gram products are summed in another order
# on two processes than on one: measured up to 4.2e-7 of the loss and 1.2e-6 of a gradient tensor's
# largest entry (fp32's epsilon is 1.2e-7). Everything the forward alone gives (projections, pooled,
# running statistics) stays float64-exact (below 1e-14 measured) and is held to 1e-10.
FP32_LOSS_TOLERANCE = 1e-5



def _global_views(name: str, splits: list[int], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return views(name, sum(splits), step)


def _collectives_of_a_step(rank: int) -> dict:
    """Collectives of one training step of the converted model (no DDP, whose gradient buckets are
    the same either way), stacked views against one forward per view."""
    splits, counts = [4, 4], {}
    x1, x2 = _global_views("resnet", splits, 0)
    rows = slice(sum(splits[:rank]), sum(splits[: rank + 1]))
    for form in ("one_forward", "two_forwards"):
        network = convert_to_global_batchnorm(build("resnet"))
        run = (lambda: network(x1[rows], x2[rows]).loss) if form == "one_forward" else (
            lambda: two_forwards(network, x1[rows], x2[rows])["loss"])
        result = {}
        counts[f"{form}_forward"] = _count(lambda: result.setdefault("loss", run()))
        counts[f"{form}_backward"] = _count(lambda: result["loss"].backward())
    counts["batchnorm_layers"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())
    return counts


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case, (name, splits, momentum) in enumerate(CASES):  # one spawn for all: start-up dominates
            rows = slice(sum(splits[:rank]), sum(splits[: rank + 1]))
            network = convert_to_global_batchnorm(build(name, momentum))
            model = DistributedDataParallel(network)
            outputs = []
            for step in range(STEPS):
                x1, x2 = _global_views(name, splits, step)
                out = model(x1[rows], x2[rows])
                out.loss.backward()  # gradients accumulate over the steps, as in the reference
                outputs.append({key: getattr(out, key).detach() for key in ("loss", "projections", "projections_2", "pooler_output")})
            torch.save({"outputs": outputs, "grads": {n: p.grad for n, p in network.named_parameters()},
                        "buffers": dict(network.named_buffers())}, os.path.join(out_dir, f"case{case}_rank{rank}.pt"))
        torch.save(_collectives_of_a_step(rank), os.path.join(out_dir, f"counts_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("views_in_batch")
    mp.spawn(_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return out_dir


def _as_saved(reference: nn.Module, saved: dict) -> nn.Module:
    """A copy of `reference` holding a process's saved gradients and buffers, under the same names."""
    model = copy.deepcopy(reference)
    for name, p in model.named_parameters():
        p.grad = saved["grads"][name]
    for name, buffer in model.named_buffers():
        buffer.copy_(saved["buffers"][name])
    return model


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_two_processes_equal_one_process_with_two_forwards(two_process_results, case):
    name, splits, momentum = CASES[case]
    reference = build(name, momentum)  # plain BatchNorm, the whole batch, one forward per view
    expected = []
    for step in range(STEPS):
        x1, x2 = _global_views(name, splits, step)
        out = two_forwards(reference, x1, x2)
        out["loss"].backward()
        expected.append(out)
    for rank in range(2):
        rows = slice(sum(splits[:rank]), sum(splits[: rank + 1]))
        saved = torch.load(two_process_results / f"case{case}_rank{rank}.pt")
        for got, want in zip(saved["outputs"], expected, strict=True):
            assert_exact(got["loss"], want["loss"], "loss", FP32_LOSS_TOLERANCE)
            for key in ("projections", "projections_2", "pooler_output"):
                assert_exact(got[key], want[key][rows], f"{key} of rank {rank}")
        assert_same_state(_as_saved(reference, saved), reference, gradient_tolerance=FP32_LOSS_TOLERANCE)


@pytest.mark.slow
def test_one_collective_per_batchnorm_layer_for_both_views(two_process_results):
    for rank in range(2):
        counts = torch.load(two_process_results / f"counts_rank{rank}.pt")
        # The tiny ResNet-18: the stem's, 2 per block in 8 blocks, 4 downsamples (its stem is 64 wide,
        # so layer1 downsamples too); and the projector's.
        layers = counts["batchnorm_layers"]
        assert layers == 22
        # The loss: 3 each way (see test_batchnorm_distributed); the layers: 1 each way for both views.
        assert counts["one_forward_forward"] == {"collectives": layers + 3, "host_reads": 1}
        assert counts["one_forward_backward"] == {"collectives": layers + 3, "host_reads": 0}
        # One forward per view, as before #32: each layer once per view.
        assert counts["two_forwards_forward"] == {"collectives": 2 * layers + 3, "host_reads": 1}
        assert counts["two_forwards_backward"] == {"collectives": 2 * layers + 3, "host_reads": 0}
