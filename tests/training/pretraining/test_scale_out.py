"""Several processes as users launch them: two nodes through torchrun's c10d rendezvous, and
gradients sent in bf16 (`--ddp_comm_hook bf16`). Each run is the trainer in its own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.training.pretraining_inputs import TINY, history


STEPS = 4



def _torchrun(launch: list[str], args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "training.pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _args(parquet_folder: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--dataset_name", str(parquet_folder), "--max_train_steps", str(STEPS), *TINY,
            "--output_dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def one_node_two_processes(parquet_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale_out") / "one_node"
    _finish(_torchrun(["--nproc_per_node", "2"], _args(parquet_folder, out)))
    return out


@pytest.mark.slow
def test_two_nodes_train_exactly_as_one_node_with_two_processes(one_node_two_processes, parquet_folder, tmp_path):
    # Two "machines" on localhost: one process each, meeting through a c10d rendezvous on node 0.
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two_nodes"  # shared, as on a cluster's shared file system
    nodes = [
        _torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", endpoint, "--rdzv_id", "barlow-test", "--rdzv_conf", f"is_host={int(rank == 0)}"],
                  _args(parquet_folder, out))
        for rank in range(2)
    ]
    for node in nodes:
        _finish(node)
    run = json.loads((out / "training_args.json").read_text())
    assert run["num_processes"] == 2 and run["global_batch_size"] == 32
    # The same processes, ranks, shards and seeds as on one node: the same numbers.
    two_nodes, one_node = history(out), history(one_node_two_processes)
    assert [h["step"] for h in two_nodes] == list(range(1, STEPS + 1))
    for a, b in zip(two_nodes, one_node, strict=True):
        for term in ("train_loss", "on_diagonal_loss", "off_diagonal_loss"):
            assert a[term] == pytest.approx(b[term], rel=1e-6), (a["step"], term)
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


@pytest.mark.slow
def test_bf16_gradient_compression_rounds_the_updates_only(one_node_two_processes, parquet_folder, tmp_path):
    out = tmp_path / "bf16_hook"
    _finish(_torchrun(["--nproc_per_node", "2"], _args(parquet_folder, out, "--ddp_comm_hook", "bf16")))
    compressed, full = history(out), history(one_node_two_processes)
    # Step 1's loss comes before any gradient is exchanged: identical.
    assert compressed[0]["train_loss"] == full[0]["train_loss"]
    # Later steps follow bf16-rounded gradients: different, proving the hook ran, and close.
    later = list(zip(compressed[1:], full[1:], strict=True))
    assert any(a["train_loss"] != b["train_loss"] for a, b in later)
    for a, b in later:
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02), a["step"]
