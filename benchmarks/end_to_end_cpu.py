"""End-to-end CPU training throughput: how much of the bare training step barlow-pretrain keeps.

    python benchmarks/end_to_end_cpu.py                     # data and runs under /tmp/barlow_bench_e2e

* ours: ``barlow-pretrain`` (``python -m training.pretrain`` in a subprocess, as the console
  script runs it) on Fashion-MNIST parquet shards (streamed, decoded and augmented by the
  DataLoader with ``--dataloader_num_workers 1``): the trainer's own ``images_per_second`` from
  ``output_dir/log_history.jsonl``, first logging window skipped (start-up, first batches).
* baseline: the same model's training step alone, in this process, on one batch of two views
  already in memory (made by the same collator from the same data): forward, backward, the same
  optimizer (``training.shared.optim.create_optimizer``, LARS with the trainer's defaults), zero_grad.

ratio = ours / baseline = the share of the bare step's throughput that the whole trainer keeps.
``details.data_wait_fraction`` is the trainer's own share of wall time spent waiting for batches.

On a 2-core machine the data worker competes with the step's intra-op threads for the cores, so
a share below 1 here is partly contention that a machine with more cores would not have; the
baseline has both cores to itself. Runs alternate (trainer run, step-alone run, ...); medians.
The defaults (batch 64, 15 steps logged every 5, 3 runs of each) aim at about 10 minutes on a
shared 2-core machine, where one step of this model takes 3 to 10 seconds depending on the load.
Writes benchmarks/results/end_to_end_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO_ROOT, alternate, median, write_result

sys.path.insert(0, str(REPO_ROOT))

from fashion_mnist import IDX_DIR, convert

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining
from training.shared.augment import TwoViewTransform
from training.shared.collate import TwoViewCollator
from training.shared.data import load_image_dataset, prepare_stream, resolve_image_column
from training.shared.optim import create_optimizer

DEFAULT_WORK_DIR = Path("/tmp/barlow_bench_e2e")
BACKBONE_KWARGS = '{"channels": [32, 64, 128, 256]}'
PROJECTOR_DIMS = [2048, 2048, 2048]
LOG_NAME = "log_history.jsonl"


def trainer_arguments(data_dir: Path, output_dir: Path, args: argparse.Namespace) -> list[str]:
    return [
        "--dataset_name", str(data_dir), "--output_dir", str(output_dir),
        "--backbone", "resnet18", "--small_image_stem", "--image_size", "32",
        "--backbone_kwargs", BACKBONE_KWARGS, "--projector_dims", *map(str, PROJECTOR_DIMS),
        "--per_device_train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
        "--warmup_steps", "10", "--logging_steps", str(args.logging_steps),
        "--dataloader_num_workers", str(args.num_workers), "--seed", "0",
    ]


def read_windows(log_path: Path, batch_size: int, skip: int = 1) -> tuple[float, float, list[dict]]:
    """(images/s, data wait fraction) over the logged windows after the first ``skip``: total
    images over total time, and the time-weighted wait fraction."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    kept, previous_step = [], 0
    for index, row in enumerate(rows):
        steps = row["step"] - previous_step
        previous_step = row["step"]
        if index >= skip:
            kept.append({**row, "window_steps": steps})
    if not kept:
        raise RuntimeError(f"{log_path} has {len(rows)} windows; need more than {skip}")
    seconds = [r["window_steps"] * batch_size / r["images_per_second"] for r in kept]  # each window's length
    rate = sum(r["window_steps"] for r in kept) * batch_size / sum(seconds)
    wait = sum(r["data_wait_fraction"] * s for r, s in zip(kept, seconds)) / sum(seconds)
    return rate, wait, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--idx_dir", type=Path, default=IDX_DIR)
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each contender")
    parser.add_argument("--steps", type=int, default=15, help="trainer steps per run (first window skipped)")
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--step_alone_steps", type=int, default=4, help="timed bare steps per baseline run")
    parser.add_argument("--before_commit", help="Also run barlow-pretrain as of this commit (the repository "
                        "extracted with git archive), alternating: details.ours_before (issue #32 used 060923a).")
    args = parser.parse_args()
    if not (args.idx_dir / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"No Fashion-MNIST IDX files in {args.idx_dir}: apt-get install -y dataset-fashion-mnist")
    data_dir = convert(args.idx_dir, args.work_dir / "fashion_mnist")

    # The model and batch the trainer builds from these arguments (training/pretrain.py: build_model).
    torch.manual_seed(0)
    config = BarlowTwinsConfig(
        backbone="resnet18", backbone_kwargs=json.loads(BACKBONE_KWARGS), small_image_stem=True,
        projector_dims=PROJECTOR_DIMS, image_size=32,
    )
    model = BarlowTwinsForPreTraining(config).train()
    optimizer = create_optimizer(model, "lars", 0.2, 0.0048, 1.5e-6, args.batch_size)  # the trainer's defaults
    dataset = load_image_dataset(str(data_dir), None, "train", None, True, None)
    column = resolve_image_column(dataset)
    transform = TwoViewTransform(config.image_size, config.image_mean, config.image_std, config.num_channels)
    collator = TwoViewCollator(transform, column, config.num_channels)
    examples = list(prepare_stream(dataset, column, seed=0).take(args.batch_size))
    batch = collator(examples)
    views = batch["pixel_values"], batch["pixel_values_2"]

    def step() -> None:
        out = model(pixel_values=views[0], pixel_values_2=views[1])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def step_alone() -> float:
        step()  # not timed: the first step after the trainer ran in the other process
        start = time.perf_counter()
        for _ in range(args.step_alone_steps):
            step()
        return args.step_alone_steps * args.batch_size / (time.perf_counter() - start)

    trainer_runs: list[dict] = []

    def end_to_end(root: Path = REPO_ROOT) -> float:
        output_dir = args.work_dir / f"run_{len(trainer_runs)}"
        command = [sys.executable, "-m", "training.pretrain", *trainer_arguments(data_dir, output_dir, args)]
        started = time.perf_counter()
        # `-m` puts the working directory first on sys.path: the code of `root` runs.
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"barlow-pretrain failed:\n{result.stderr[-4000:]}")
        rate, wait, rows = read_windows(output_dir / LOG_NAME, args.batch_size)
        trainer_runs.append({
            "images_per_second": round(rate, 2), "data_wait_fraction": round(wait, 4),
            "windows": [{k: row[k] for k in ("step", "images_per_second", "data_wait_fraction")} for row in rows],
            "process_wall_s": round(time.perf_counter() - started, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "code": "working tree" if root == REPO_ROOT else f"commit {args.before_commit}",
        })
        print(trainer_runs[-1], flush=True)
        return rate

    contenders = {"ours": end_to_end, "baseline": step_alone}
    if args.before_commit:
        before_root = args.work_dir / f"code_{args.before_commit}"
        if not before_root.is_dir():
            before_root.mkdir(parents=True)
            archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", args.before_commit], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before_root)], input=archive, check=True)
        contenders["ours_before"] = lambda: end_to_end(before_root)
    samples = alternate(contenders, runs=args.runs, warmup=0)
    ours, baseline = median(samples["ours"]), median(samples["baseline"])
    waits = [run["data_wait_fraction"] for run in trainer_runs if run["code"] == "working tree"]
    before = {"before_commit": args.before_commit,
              "ours_before": round(median(samples["ours_before"]), 2),
              "speedup_over_before": round(ours / median(samples["ours_before"]), 4)} if args.before_commit else {}
    write_result(
        "end_to_end_cpu",
        ours=round(ours, 2),
        baseline=round(baseline, 2),
        unit="images/s (pairs of views per second)",
        higher_is_better=True,
        target="share of the bare step's throughput kept end to end (ratio); no fixed target",
        details={
            "ours": "barlow-pretrain (python -m training.pretrain) images_per_second from log_history.jsonl, "
                    "windows after the first, total images over total time",
            "baseline": f"the same model's step alone on one in-memory batch: forward, backward, LARS step, zero_grad; "
                        f"{args.step_alone_steps} timed steps per run after one untimed step",
            "trainer_arguments": trainer_arguments(data_dir, Path("<output_dir>"), args),
            "data_wait_fraction": round(median(waits), 4),
            "data_wait_fraction_runs": waits,
            "share_of_time_lost_to_data": "data_wait_fraction: time waiting for the next batch over wall time",
            "samples_images_per_s": {k: [round(v, 2) for v in vs] for k, vs in samples.items()},
            "trainer_runs": trainer_runs,
            "torch_threads_step_alone": torch.get_num_threads(),
            **before,
            "note": (
                "2-core machine shared with other jobs: the trainer's DataLoader worker (decode + augment, one "
                "thread) competes with the step's two intra-op threads for the same 2 cores, so part of the loss "
                "is CPU contention, not waiting; the step-alone baseline has the cores to itself. Runs alternate."
            ),
        },
    )


if __name__ == "__main__":
    main()
