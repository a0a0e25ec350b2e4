"""Weak scaling of a training step on gloo: 2 processes x 1 thread x batch N against 1 process x 1 thread x batch N.

    python benchmarks/distributed_step_cpu.py [--batch_size 64] [--rounds 3] [--steps 4]

The same work per process: ``BarlowTwinsForPreTraining`` (ResNet-18 with the small-image stem at
32 px, projector ``--projector_dims``) on N random pairs of views, one step = forward of both
views, the loss, backward, LARS step, zero_grad. One process runs the plain model, as
``barlow-pretrain`` does alone; two run it as ``barlow-pretrain`` does under ``torchrun``:
BatchNorm layers converted to ``GlobalBatchNorm``, DDP over gloo, one thread each.
``ratio`` = seconds per step of one process / of two (1 is perfect weak scaling).

"Before" is the same two configurations with ``modeling_barlow`` as it stood at ``--before_commit``
(extracted with ``git archive``). The default is the last commit before issue #32: one forward per
view, so every BatchNorm layer sent one collective per view each way. ``--before_commit b8d3cc1``
gives the code before issue #21 (the count all-reduced and read back in every BatchNorm forward,
then two all-reduces for the mean and the variance), which results/distributed_step_cpu.json held
until #32.

Counts per step (one step of rank 0, after the timed ones): ``collectives_per_step``, every gloo
collective torch.profiler records (DDP's gradient buckets and buffer broadcasts included), and
``host_syncs_per_step``, every read of a tensor's value by the host (``aten._local_scalar_dense``
behind ``.item()``, ``int()``, ``float()``, ``bool()``; ``nonzero``, ``equal``, ``masked_select``;
``.tolist()``), each of which waits for an accelerator's queue to drain.

Each round launches the four configurations in turn (1 process, 2 processes, and both before),
each with one untimed warm-up step; medians over rounds x steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPO_ROOT, median, write_result  # noqa: E402


NAME = "distributed_step_cpu"
TARGET = "ratio >= 0.85"
IMAGE_SIZE = 32
# The last commit before issue #32's one forward for both views (#21's was b8d3cc1).
BEFORE_COMMIT = "060923a"
HOST_READ_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select"}


# ------------------------------------------------------------------------------------------ worker
def _host_read_counter():
    """A context manager counting host reads (see the module docstring); its ``count`` after exit."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in HOST_READ_OPS:
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    class ToList(TorchFunctionMode):  # reads a CPU tensor's memory with no dispatched op
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "tolist":
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    class Both:
        def __enter__(self):
            self.modes = [ToList(), Reads()]
            for mode in self.modes:
                mode.__enter__()
            return self

        def __exit__(self, *exc):
            for mode in reversed(self.modes):
                mode.__exit__(*exc)

        @property
        def count(self) -> int:
            return Reads.count

    return Both()


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration; rank 0 prints one JSON line."""
    if args.code_dir:  # modeling_barlow as of --before_commit, ahead of the working tree's
        sys.path.insert(0, args.code_dir)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, convert_to_global_batchnorm
    from training.shared.optim import create_optimizer

    torch.manual_seed(0)
    config = BarlowTwinsConfig(backbone="resnet18", small_image_stem=True, image_size=IMAGE_SIZE,
                               projector_dims=[int(d) for d in args.projector_dims.split("-")])
    model = BarlowTwinsForPreTraining(config).train()
    batchnorm_layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(convert_to_global_batchnorm(model))
    optimizer = create_optimizer(model, "lars", 0.2, 0.0048, 1.5e-6, global_batch_size=args.batch_size * world)
    generator = torch.Generator().manual_seed(1 + rank)
    shape = (args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    x1, x2 = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)

    def step() -> float:
        loss = model(pixel_values=x1, pixel_values_2=x2).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    step()  # warm-up: allocations, oneDNN primitives, DDP's buckets
    seconds, cpu_seconds, losses = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    counts = None
    if world > 1:
        reads = _host_read_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, reads:
            step()
        collectives = {e.key: e.count for e in profile.key_averages() if e.key.startswith(("gloo:", "nccl:"))}
        counts = {"collectives": collectives, "collectives_per_step": sum(collectives.values()),
                  "host_syncs_per_step": reads.count}
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "losses": [float(v) for v in losses], "counts": counts,
                          "batchnorm_layers": batchnorm_layers}))


# ------------------------------------------------------------------------------------------ launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: argparse.Namespace, code_dir: str | None) -> dict:
    """Run one configuration: ``world`` worker processes of this script; rank 0's JSON."""
    port = _free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch_size", str(args.batch_size),
               "--steps", str(args.steps), "--projector_dims", args.projector_dims]
    if code_dir:
        command += ["--code_dir", code_dir]
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    processes = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=3600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"a {world}-process worker failed:\n{err[-4000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def extract_code(commit: str, into: Path) -> str:
    """``modeling_barlow`` as of ``commit``, written under ``into``; the folder to put on sys.path."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit, "modeling_barlow"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=64, help="Images per view per process (N).")
    parser.add_argument("--projector_dims", default="2048-2048-2048", help="Projector widths.")
    parser.add_argument("--rounds", type=int, default=3, help="Launches of each configuration, alternating.")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per launch (after one warm-up step).")
    parser.add_argument("--before_commit", default=BEFORE_COMMIT,
                        help="Commit whose modeling_barlow is 'before' (empty: skip the before runs).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    load_before = os.getloadavg()
    started = time.perf_counter()
    configurations = {"one_process": (1, None), "two_processes": (2, None)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before_commit:
            before_code = extract_code(args.before_commit, Path(tmp))
            configurations["one_process_before"] = (1, before_code)
            configurations["two_processes_before"] = (2, before_code)
        runs = {name: [] for name in configurations}
        for index in range(args.rounds):
            order = list(configurations) if index % 2 == 0 else list(reversed(configurations))
            for name in order:
                world, code_dir = configurations[name]
                runs[name].append(launch(world, args, code_dir))
                print(f"round {index + 1}/{args.rounds} {name}: {[round(s, 2) for s in runs[name][-1]['seconds']]} s/step",
                      flush=True)
    seconds = {name: [s for run in found for s in run["seconds"]] for name, found in runs.items()}
    medians = {name: median(values) for name, values in seconds.items()}
    cpu_medians = {name: median([s for run in found for s in run["cpu_seconds"]]) for name, found in runs.items()}
    counts = {name: found[-1]["counts"] for name, found in runs.items() if found[-1]["counts"]}
    same = all(run["counts"] == found[0]["counts"] for found in runs.values() for run in found)
    after, before = counts["two_processes"], counts.get("two_processes_before")
    extra = {
        "collectives_per_step": {"after": after["collectives_per_step"],
                                 **({"before": before["collectives_per_step"]} if before else {})},
        "host_syncs_per_step": {"after": after["host_syncs_per_step"],
                                **({"before": before["host_syncs_per_step"]} if before else {})},
    }
    details = {
        "network": f"BarlowTwinsForPreTraining: timm resnet18, small-image stem, {IMAGE_SIZE} px, projector {args.projector_dims}",
        "batchnorm_layers": runs["one_process"][0]["batchnorm_layers"],
        "batch_size_per_process": args.batch_size,
        "threads_per_process": 1,
        "one_process": "the plain model, no torch.distributed (as barlow-pretrain alone)",
        "two_processes": "GlobalBatchNorm + DistributedDataParallel over gloo (as barlow-pretrain under torchrun)",
        "two_processes_before": f"the same with modeling_barlow from commit {args.before_commit}" if before else None,
        "one_process_before": f"the plain model with modeling_barlow from commit {args.before_commit}" if before else None,
        "ratio_before": round(medians["one_process_before"] / medians["two_processes_before"], 4) if before else None,
        "speedup_over_before": {"one_process": round(medians["one_process_before"] / medians["one_process"], 4),
                                "two_processes": round(medians["two_processes_before"] / medians["two_processes"], 4)}
        if before else None,
        "median_seconds_per_step": {name: round(v, 3) for name, v in medians.items()},
        # CPU time of rank 0's process (all its threads, gloo's included): the work distribution adds,
        # apart from waiting, which a loaded machine inflates.
        "median_cpu_seconds_per_step": {name: round(v, 3) for name, v in cpu_medians.items()},
        "cpu_ratio": round(cpu_medians["one_process"] / cpu_medians["two_processes"], 4),
        "seconds_per_step": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "collectives_by_kind": {name: c["collectives"] for name, c in counts.items()},
        "counts_equal_in_every_round": same,
        "first_losses": {name: [round(run["losses"][0], 3) for run in found] for name, found in runs.items()},
        "rounds": args.rounds,
        "steps_per_launch": args.steps,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_result(NAME, ours=medians["two_processes"], baseline=medians["one_process"], unit="s/step",
                 higher_is_better=False, target=TARGET, details=details, extra=extra)


if __name__ == "__main__":
    main()
