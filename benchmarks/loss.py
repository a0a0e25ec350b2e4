"""The Barlow Twins loss alone on the CPU, forward + backward: ours against lightly, and two processes.

    python benchmarks/loss.py

* ours: ``modeling_barlow.loss.barlow_twins_loss`` on its automatic path (Gram when N < D,
  direct otherwise); baseline: ``lightly.loss.BarlowTwinsLoss``, with lightly's lambda set to
  our ``off_diagonal_weight`` (0.0051; lightly's default is 5e-3). Both standardise each view
  with BatchNorm statistics (biased variance, eps 1e-5) and divide C by N, with no further scale,
  so with ``loss_scale=1`` the two compute the same value: checked below (value and input
  gradients) before anything is timed, and the values are recorded for every shape.
* Shapes (D, N): (8192, 256), (2048, 256), (2048, 4096). Each is timed with
  ``common.alternate`` (``--runs`` runs after a warm-up; in a run each contender repeats its call
  enough times to last about ``--min_run_seconds``); the medians give seconds per forward + backward.
* Memory: for each shape and contender its own process (``--memory_worker``), peak resident set
  above the one right after the imports, over making the inputs and two forward + backward calls.
* Two processes (gloo, ``torch.multiprocessing.spawn``, one thread each): ours, which gathers
  the rows of both views for the Gram sums, against the authors' release pattern: each process
  forms its local C = bn(z1)^T bn(z2) / N_global and sums it with ``dist.all_reduce(C)``
  (outside autograd, as the release does), then the loss on C. ``bn`` is BatchNorm1d(D,
  affine=False) with global statistics: the release converts it to SyncBatchNorm, which refuses
  CPU tensors, so ``GlobalBatchNorm`` (the same statistics through gloo) stands in for it.

The top-level numbers of ``results/loss.json`` are those of (D=8192, N=256); every shape is in
``details["shapes"]`` and the two-process run in ``details["two_process"]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import alternate, measure_peak_above_start, median, run_memory_worker, timed, write_result  # noqa: E402


NAME = "loss"
LAMBDA = 0.0051  # our off_diagonal_weight default, the release's value; lightly's default is 5e-3
FLOAT_BYTES = 4
# (D, N, time ratio target, memory ratio target or None)
SHAPES = [(8192, 256, 10.0, 0.25), (2048, 256, 2.0, None), (2048, 4096, 0.95, None)]


def _inputs(dim: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, dim, generator=generator)
    # Correlated views, as trained projections are: C is then far from zero on the diagonal.
    z2 = 0.8 * z1 + 0.6 * torch.randn(n, dim, generator=generator)
    return z1.requires_grad_(), z2.requires_grad_()


def _ours():
    from modeling_barlow.loss import barlow_twins_loss

    return lambda z1, z2: barlow_twins_loss(z1, z2, off_diagonal_weight=LAMBDA, loss_scale=1.0).loss


def _baseline():
    from lightly.loss import BarlowTwinsLoss

    return BarlowTwinsLoss(lambda_param=LAMBDA)


CONTENDERS = {"ours": _ours, "baseline": _baseline}


def _forward_backward(loss_fn, z1: torch.Tensor, z2: torch.Tensor) -> float:
    z1.grad = z2.grad = None
    loss = loss_fn(z1, z2)
    loss.backward()
    return float(loss.detach())


def check_agreement(dim: int = 96, n: int = 40) -> dict:
    """Both losses give the same value and the same input gradients, at a small shape, in fp32."""
    values, grads = {}, {}
    for name, make in CONTENDERS.items():
        z1, z2 = _inputs(dim, n, seed=3)
        values[name] = _forward_backward(make(), z1, z2)
        grads[name] = (z1.grad.clone(), z2.grad.clone())
    if not math.isclose(values["ours"], values["baseline"], rel_tol=1e-5):
        raise AssertionError(f"the two losses disagree at D={dim}, N={n}: {values}")
    for got, want in zip(grads["ours"], grads["baseline"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    return {"D": dim, "N": n, "loss": values, "value_rel_tol": 1e-5, "grad_rtol": 1e-4, "agree": True}


def memory_worker(name: str, dim: int, n: int) -> None:
    """Peak resident set above the one right after the imports, over making the two inputs and
    two forward + backward calls; prints one JSON line."""
    loss_fn = CONTENDERS[name]()  # imports the contender's module

    def workload() -> None:
        z1, z2 = _inputs(dim, n)
        for _ in range(2):
            _forward_backward(loss_fn, z1, z2)

    peak = measure_peak_above_start(workload)
    print(json.dumps({"contender": name, "D": dim, "N": n, "peak_bytes": peak}))


def bench_shape(dim: int, n: int, runs: int, min_run_seconds: float) -> dict:
    fns = {name: make() for name, make in CONTENDERS.items()}
    z1, z2 = _inputs(dim, n)
    values = {name: _forward_backward(fn, z1, z2) for name, fn in fns.items()}  # also a warm-up
    # Each contender repeats its call enough to fill about min_run_seconds, so runs of both last
    # alike and a fast contender is not timed on a single short call.
    repeats = {
        name: max(1, math.ceil(min_run_seconds / max(timed(lambda fn=fn: _forward_backward(fn, z1, z2)), 1e-6)))
        for name, fn in fns.items()
    }

    def contender(name):
        def one_run() -> float:
            return timed(lambda: [_forward_backward(fns[name], z1, z2) for _ in range(repeats[name])]) / repeats[name]
        return one_run

    samples = alternate({name: contender(name) for name in fns}, runs=runs)
    return {"samples": samples, "repeats_per_run": repeats, "loss_values": values}


def _path(dim: int, n: int) -> str:
    return "gram" if n < dim else "direct"


# --------------------------------------------------------------------------------- two processes
def _authors_loss(z1: torch.Tensor, z2: torch.Tensor, bn: torch.nn.Module, n_global: int) -> torch.Tensor:
    """The release's pattern: local C over the global batch size, summed by a plain all_reduce."""
    c = bn(z1).T @ bn(z2)
    c.div_(n_global)
    with torch.no_grad():  # outside autograd, as in the release (c10d has no autograd kernel)
        dist.all_reduce(c)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    d = c.shape[0]
    off_diag = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten().pow_(2).sum()
    return on_diag + LAMBDA * off_diag


def _collectives_seen(fn) -> list[dict]:
    """The collectives one forward + backward issues, from torch.profiler (names and shapes)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    seen: dict[tuple, int] = {}
    for event in prof.events():
        name = event.name
        if any(key in name for key in ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter")):
            if name.startswith(("c10d::", "_c10d_functional::")):
                key = (name, str([list(s) for s in event.input_shapes if s]))
                seen[key] = seen.get(key, 0) + 1
    return [{"op": k[0], "input_shapes": k[1], "count": v} for k, v in sorted(seen.items())]


def _two_process_worker(rank: int, world: int, port: int, out_file: str, dim: int, sizes: list[int], runs: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from modeling_barlow import convert_to_global_batchnorm
        from modeling_barlow.loss import barlow_twins_loss

        results = {}
        for n in sizes:
            z1, z2 = _inputs(dim, n, seed=10 + rank)
            bn = convert_to_global_batchnorm(torch.nn.BatchNorm1d(dim, affine=False)).train()
            fns = {
                "ours": lambda: barlow_twins_loss(z1, z2, off_diagonal_weight=LAMBDA).loss,
                "authors": lambda: _authors_loss(z1, z2, bn, n * world),
            }

            def call(fn) -> float:
                z1.grad = z2.grad = None
                loss = fn()
                loss.backward()
                return float(loss.detach())

            values = {name: call(fn) for name, fn in fns.items()}
            if not math.isclose(values["ours"], values["authors"], rel_tol=1e-4):
                raise AssertionError(f"two processes, N={n}: ours and the authors' loss disagree: {values}")
            seen = {name: _collectives_seen(lambda fn=fn: call(fn)) for name, fn in fns.items()}

            def contender(fn):
                def one_run() -> float:
                    dist.barrier()
                    return timed(lambda: call(fn))
                return one_run

            samples = alternate({name: contender(fn) for name, fn in fns.items()}, runs=runs)
            gathered = [None] * world
            dist.all_gather_object(gathered, samples)
            results[n] = {"loss_values": values, "collectives_seen_rank0": seen, "samples_by_rank": gathered}
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bytes_sent_per_process(dim: int, n_local: int, world: int) -> dict:
    """Bytes each process sends in one forward + backward, from tensor sizes (ring algorithms)."""
    ring = (world - 1) / world
    vector = dim * FLOAT_BYTES
    # Ours (Gram): per view, an all_gather of the N_local x D standardised rows (each process
    # sends its block to the world - 1 others: (W-1) N D 4 bytes), whose backward is a
    # reduce-scatter of the same size. Plus D-vector all_reduces (2 W-1 / W * 4 D each): the mean
    # and the variance of each view and diag(C), 5 forward, and their 5 gradients backward.
    # Left out: a few 8-byte messages (the global count, the gathered row counts, the fp64 Frobenius
    # sum and its gradient).
    ours_gather = 2 * 2 * (world - 1) * n_local * vector
    ours_vectors = 2 * 5 * 2 * ring * vector
    # Authors: one all_reduce of the D x D C (2 (W-1)/W D^2 4 bytes), none in backward; plus the
    # global BatchNorm's statistics: mean and variance per view forward and their gradients.
    authors_c = 2 * ring * dim * vector
    authors_vectors = 2 * 4 * 2 * ring * vector
    return {
        "formula": (
            "ring algorithms, fp32: all_gather of an N_local x D block sends (W-1)*N_local*D*4 bytes per process, "
            "its backward (reduce-scatter) the same; all_reduce of S bytes sends 2*(W-1)/W*S. "
            "ours = 2 views * 2 (fwd+bwd) * (W-1)*N_local*D*4 + 10 D-vector all_reduces; "
            "authors = 2*(W-1)/W * D*D*4 (one all_reduce of C, no backward communication) + 8 D-vector all_reduces "
            "(global BatchNorm statistics and their gradients); 8-byte scalars left out. "
            "collectives_seen_rank0 lists what torch.profiler saw in one forward+backward."
        ),
        "ours_bytes": int(ours_gather + ours_vectors),
        "authors_bytes": int(authors_c + authors_vectors),
        "ours_payload_bytes_all_gather_per_view": n_local * vector,
        "authors_payload_bytes_all_reduce_C": dim * vector,
    }


def two_process(dim: int, sizes: list[int], runs: int) -> dict:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "two_process.json")
        mp.spawn(_two_process_worker, args=(world, _free_port(), out_file, dim, sizes, runs), nprocs=world, join=True)
        raw = json.loads(Path(out_file).read_text())
    report = {
        "world_size": world,
        "backend": "gloo",
        "threads_per_process": 1,
        "D": dim,
        "authors_pattern": "C = GlobalBatchNorm(z1).T @ GlobalBatchNorm(z2) / N_global; dist.all_reduce(C) outside autograd; loss on C",
        "ours": "barlow_twins_loss (Gram path: all_gather of the standardised rows, autograd-aware D-vector sums)",
        "runs": runs,
        "per_process_N": {},
    }
    for n in sizes:
        entry = raw[str(n)]
        by_rank = entry["samples_by_rank"]
        # A call ends when the slower rank ends; each rank's median, then the larger of the two.
        medians = {name: max(median(r[name]) for r in by_rank) for name in ("ours", "authors")}
        sent = _bytes_sent_per_process(dim, n, world)
        report["per_process_N"][str(n)] = {
            "global_N": n * world,
            "ours_s": round(medians["ours"], 4),
            "authors_s": round(medians["authors"], 4),
            "speedup": round(medians["authors"] / medians["ours"], 3),
            "seconds_by_rank": {name: [[round(v, 4) for v in r[name]] for r in by_rank] for name in ("ours", "authors")},
            "loss_values": entry["loss_values"],
            "bytes_sent_per_process": sent,
            "bytes_ratio_authors_over_ours": round(sent["authors_bytes"] / sent["ours_bytes"], 2),
            "collectives_seen_rank0": entry["collectives_seen_rank0"],
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="Timed runs per contender and shape (alternating).")
    parser.add_argument("--min_run_seconds", type=float, default=2.0, help="A run repeats the call to last this long.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (one process).")
    parser.add_argument("--two_process_sizes", default="256,128", help="Per-process N for the two-process run ('' skips it).")
    parser.add_argument("--memory_worker", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.dim, args.n)

    started = time.perf_counter()
    agreement = check_agreement()
    shapes, top = [], None
    for dim, n, target, memory_target in SHAPES:
        timing = bench_shape(dim, n, args.runs, args.min_run_seconds)
        memory = {
            name: run_memory_worker(
                Path(__file__),
                ["--memory_worker", name, "--dim", str(dim), "--n", str(n), "--threads", str(args.threads)],
            )["peak_bytes"]
            for name in CONTENDERS
        }
        seconds = {name: median(values) for name, values in timing["samples"].items()}
        ratio = seconds["baseline"] / seconds["ours"]
        memory_ratio = memory["ours"] / memory["baseline"]
        met = ratio >= target and (memory_target is None or memory_ratio <= memory_target)
        values = timing["loss_values"]
        entry = {
            "D": dim,
            "N": n,
            "our_path": _path(dim, n),
            "ours_s": round(seconds["ours"], 6),
            "baseline_s": round(seconds["baseline"], 6),
            "ratio": round(ratio, 3),
            "memory_ratio": round(memory_ratio, 4),
            "peak_rss_above_start_bytes": memory,
            "target": f"ratio >= {target}" + (f", memory_ratio <= {memory_target}" if memory_target else ""),
            "met": met,
            "repeats_per_run": timing["repeats_per_run"],
            "seconds_by_run": {name: [round(v, 6) for v in vs] for name, vs in timing["samples"].items()},
            "loss_values": values,
            "loss_rel_diff": abs(values["ours"] - values["baseline"]) / abs(values["baseline"]),
        }
        print(json.dumps({k: entry[k] for k in ("D", "N", "our_path", "ours_s", "baseline_s", "ratio", "memory_ratio", "met")}))
        shapes.append(entry)
        if top is None:
            top = entry
    details = {
        "lambda": LAMBDA,
        "loss_scale": 1.0,
        "normalisation": (
            "identical: both standardise each view with batch statistics (biased variance, eps 1e-5), "
            "C = a^T b / N, loss = sum (1 - C_ii)^2 + lambda * sum_{i!=j} C_ij^2, no extra scale; "
            "lightly's default lambda is 5e-3, set here to 0.0051"
        ),
        "agreement_check": agreement,
        "runs": args.runs,
        "memory_method": "own process per contender and shape; VmHWM above VmRSS after the imports, over making the inputs and 2 forward+backward calls",
        "shapes": shapes,
    }
    sizes = [int(s) for s in args.two_process_sizes.split(",") if s.strip()]
    if sizes:
        details["two_process"] = two_process(8192, sizes, args.runs)
        print(json.dumps({n: {k: v for k, v in e.items() if k in ("ours_s", "authors_s", "speedup")}
                          for n, e in details["two_process"]["per_process_N"].items()}))
    details["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_result(
        NAME,
        ours=top["ours_s"],
        baseline=top["baseline_s"],
        unit="seconds per forward+backward (D=8192, N=256)",
        higher_is_better=False,
        memory_ratio=top["memory_ratio"],
        target="D=8192,N=256: ratio >= 10, memory_ratio <= 0.25; D=2048,N=256: ratio >= 2; D=2048,N=4096: ratio >= 0.95",
        details=details,
    )


if __name__ == "__main__":
    main()
