"""Loader throughput of the classifier loop (barlow-finetune, semi-supervised, augmented linear probe)
across epochs: loaders that keep their workers against loaders made anew every epoch.

    python benchmarks/classifier_loader.py              # Fashion-MNIST parquet under /tmp/barlow_bench_loader

What a training loop sees of the data, without a model: each run is ``--epochs`` epochs of the
training loader followed, as barlow-finetune does at each epoch end, by one pass of the held-out
loader. Both contenders use ``LabelledData`` with the supervised training transform at 32 px and
``--workers`` worker processes:

* ours: ``LabelledData.epoch_loaders`` and a held-out loader with ``persistent_workers=True``: the
  workers start once per run;
* baseline: ``LabelledData.loader(epoch=...)`` anew every epoch and a held-out loader without
  persistent workers, as the classifier CLIs did before: the workers start at every epoch and
  every evaluation.

Two cases: the 1% semi-supervised subset (600 class-balanced images, short epochs, where starting
the workers is most of an epoch) and a 12,000-image training split. Runs alternate; medians of
``--runs``. Images per second count training and held-out images together. Writes
benchmarks/results/classifier_loader.json (the top-level numbers: the 1% subset).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

from common import REPO_ROOT, alternate, median, write_result

sys.path.insert(0, str(REPO_ROOT))

from fashion_mnist import IDX_DIR, convert

from training.shared.augment import supervised_train_transform
from training.shared.labelled_data import class_balanced_subset, load_labelled_data

DEFAULT_WORK_DIR = Path("/tmp/barlow_bench_loader")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def measure(data, indices, batch_size: int, epochs: int, workers: int, runs: int) -> dict:
    train_transform = supervised_train_transform(32, MEAN, STD, 3, "bicubic")
    eval_transform = supervised_train_transform(32, MEAN, STD, 3, "bicubic", crop_scale=(1.0, 1.0))
    options = dict(seed=0, num_workers=workers, indices=indices)

    def count(loader) -> int:
        return sum(len(batch["pixel_values"]) for batch in loader)

    def ours() -> float:
        start = time.perf_counter()
        make_loader = data.epoch_loaders("train", train_transform, 3, batch_size, **options)
        held_out = data.loader("eval", eval_transform, 3, 512, num_workers=workers, persistent_workers=True)
        images = sum(count(make_loader(epoch)) + count(held_out) for epoch in range(epochs))
        return images / (time.perf_counter() - start)

    def baseline() -> float:
        start = time.perf_counter()
        held_out = data.loader("eval", eval_transform, 3, 512, num_workers=workers)
        images = sum(
            count(data.loader("train", train_transform, 3, batch_size, shuffle=True, epoch=epoch, **options))
            + count(held_out)
            for epoch in range(epochs)
        )
        return images / (time.perf_counter() - start)

    load_before = os.getloadavg()[0]
    samples = alternate({"ours": ours, "baseline": baseline}, runs=runs, warmup=1)
    result = {
        "train_images": len(indices) if indices is not None else data.num_examples("train"),
        "held_out_images": data.num_examples("eval"),
        "batch_size": batch_size,
        "epochs_per_run": epochs,
        "ours_images_per_s": round(median(samples["ours"]), 1),
        "baseline_images_per_s": round(median(samples["baseline"]), 1),
        "ratio": round(median(samples["ours"]) / median(samples["baseline"]), 3),
        "samples_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR, help="where the parquet data set goes")
    parser.add_argument("--idx_dir", type=Path, default=IDX_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--runs", type=int, default=5, help="alternating timed runs per contender (>= 5)")
    args = parser.parse_args()
    if not (args.idx_dir / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"No Fashion-MNIST IDX files in {args.idx_dir}: apt-get install -y dataset-fashion-mnist")

    folder = convert(args.idx_dir, args.work_dir / "fashion_mnist")

    def labelled(max_train: int, max_eval: int):
        data_args = types.SimpleNamespace(
            dataset_name=str(folder), dataset_config_name=None, train_split="train", train_dir=None,
            streaming=False, cache_dir=None, image_column=None, max_train_samples=max_train,
        )
        return load_labelled_data(data_args, types.SimpleNamespace(eval_split="test", label_column=None,
                                                                   max_eval_samples=max_eval))

    full = labelled(60_000, 2_000)
    subset = class_balanced_subset(full.labels("train"), 0.01, seed=0)
    semi = measure(full, subset, 256, 10, args.workers, args.runs)
    split = measure(labelled(12_000, 2_000), None, 512, 3, args.workers, args.runs)

    write_result(
        "classifier_loader",
        ours=semi["ours_images_per_s"],
        baseline=semi["baseline_images_per_s"],
        unit="images/s through the classifier loop's loaders (1% subset: 10 epochs of 600, each + 2,000 held out)",
        higher_is_better=True,
        target="no fixed target (issue #8: workers that restart every epoch)",
        details={
            "semi_1pct_subset": semi,
            "training_split_12000": split,
            "workers": args.workers,
            "setup": (
                "Fashion-MNIST parquet, map-style (--no_streaming); supervised training transform at 32 px "
                "(random resized crop 0.08-1, flip, normalise), held-out passes with whole images; no model"
            ),
            "ours": "LabelledData.epoch_loaders + held-out loader with persistent_workers=True",
            "baseline": "LabelledData.loader(epoch=...) anew every epoch + held-out loader without persistent workers",
        },
    )


if __name__ == "__main__":
    main()
