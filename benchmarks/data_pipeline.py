"""Two-view pairs per second per core: our CPU augmentation against torchvision's PIL transforms.

    python benchmarks/data_pipeline.py                      # data under /tmp/barlow_bench_data

Both contenders run the trainer's own data path in the main process (DataLoader num_workers=0,
torch at one thread, as in a DataLoader worker), so the number is per core:
``load_image_dataset`` -> ``prepare_stream`` (streamed parquet, undecoded bytes, shuffle buffer)
-> ``DataLoader(collate_fn=TwoViewCollator(transform))``, which decodes each image with PIL and
calls ``transform(image) -> (view1, view2)``. Only the transform differs:

* ours: ``training.shared.augment.TwoViewTransform``, built as ``barlow-pretrain`` builds it;
* baseline: ``torchvision.transforms`` (v1) on PIL images with the paper's parameters
  (RandomResizedCrop(scale 0.08-1, bicubic), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
  grayscale p 0.2, GaussianBlur(sigma 0.1-2) p 1.0 / 0.1, solarize p 0 / 0.2, ToTensor,
  Normalize), one pipeline per view, the blur kernel side our 10% rule (23 at 224 px).

Data: real images only. (a) Fashion-MNIST (28x28 greyscale; converted by
``benchmarks/fashion_mnist.py``'s ``convert``), at 32 px, as a small-image-stem run uses it;
(b) JPEG crops of scikit-learn's two sample photos with the short side at 256 px, at 224 px.
The top-level ours/baseline is (b), the realistic case; both are in ``details``.

Timing: each contender keeps one stream iterator for the whole run, so a run is steady-state
work: fetch ``--*_batches`` batches; the data sets are large enough that no timed run reaches an
epoch's end (datasets sleeps 5 s there; measured separately in ``details.epoch_end_stall``).
Runs alternate (``common.alternate``); medians of ``--runs`` runs. Writes
benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
from common import REPO_ROOT, alternate, make_photo_parquet, median, write_result
from torch.utils.data import DataLoader

sys.path.insert(0, str(REPO_ROOT))

from fashion_mnist import IDX_DIR, convert

from modeling_barlow import BarlowTwinsConfig
from training.shared.augment import BARLOW_TWINS_VIEW1, TwoViewCropTransform, TwoViewTransform
from training.shared.collate import TwoViewCollator
from training.shared.data import load_image_dataset, prepare_stream, resolve_image_column

DEFAULT_WORK_DIR = Path("/tmp/barlow_bench_data")


# ------------------------------------------------------------------------------------- contenders
def torchvision_v1_two_views(image_size: int, mean, std):
    """The baseline: two torchvision.transforms (v1) pipelines on PIL images, the paper's parameters."""
    from torchvision import transforms as T

    kernel = BARLOW_TWINS_VIEW1.blur_kernel_size(image_size)

    def view(blur_p: float, solarize_p: float) -> T.Compose:
        return T.Compose([
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            T.RandomSolarize(128, p=solarize_p),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])

    view1, view2 = view(1.0, 0.0), view(0.1, 0.2)
    return lambda image: (view1(image), view2(image))


def batches_forever(data_dir: Path, transform, num_channels: int, batch_size: int, seed: int):
    """The trainer's data path (training/pretrain.py), epoch after epoch, in this process."""
    dataset = load_image_dataset(str(data_dir), None, "train", None, True, None)
    image_column = resolve_image_column(dataset)
    stream = prepare_stream(dataset, image_column, seed=seed)  # the trainer's defaults: shuffle buffer 10 000
    collator = TwoViewCollator(transform, image_column, num_channels)
    for epoch in itertools.count():
        stream.set_epoch(epoch)
        loader = DataLoader(
            stream, batch_size=batch_size, collate_fn=collator, num_workers=0, drop_last=True,
            generator=torch.Generator().manual_seed(seed + epoch),
        )
        yield from loader


def epoch_end_stall(data_dir: Path) -> dict:
    """Seconds for one pass over the undecoded stream, with and without datasets' sleep when its
    shard-reader threads shut down (``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN``)."""
    import datasets

    stream = prepare_stream(load_image_dataset(str(data_dir), None, "train", None, True, None), "image", seed=0)
    saved, passes = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN, {}
    try:
        for label, sleep in (("as_shipped", saved), ("sleep_set_to_0", 0)):
            datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = sleep
            start = time.perf_counter()
            rows = sum(1 for _ in stream)
            passes[label] = round(time.perf_counter() - start, 2)
    finally:
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = saved
    return {"rows": rows, "full_pass_s": passes, "datasets_SLEEP_TIME_ON_THREADS_SHUTDOWN": saved}


def measure(name: str, data_dir: Path, image_size: int, batch_size: int, batches: int, runs: int, rows: int) -> dict:
    if (1 + (runs + 1) * batches) * batch_size > rows:  # the timed runs must not reach an epoch's end
        raise ValueError(f"{name}: {runs} runs of {batches} batches of {batch_size} need more than {rows} rows")
    config = BarlowTwinsConfig(
        backbone="resnet18", small_image_stem=image_size <= 64, image_size=image_size, projector_dims=[64]
    )
    mean, std = config.image_mean, config.image_std
    interpolation = torch_interpolation(config.interpolation)
    ours = TwoViewTransform(config.image_size, mean, std, config.num_channels, interpolation)
    baseline = torchvision_v1_two_views(config.image_size, mean, std)
    # Not a contender: what a loader worker does under --augment_on_device (decode and two uint8
    # crops; the rest runs on the accelerator), for how many workers a GPU's step rate needs.
    crops_only = TwoViewCropTransform(config.image_size, config.num_channels, interpolation)
    streams = {
        "ours": batches_forever(data_dir, ours, config.num_channels, batch_size, seed=0),
        "baseline": batches_forever(data_dir, baseline, config.num_channels, batch_size, seed=0),
        "crops_only": batches_forever(data_dir, crops_only, config.num_channels, batch_size, seed=0),
    }
    for stream in streams.values():
        batch = next(stream)  # fills the shuffle buffer; checks the output
        assert batch["pixel_values"].shape == (batch_size, config.num_channels, image_size, image_size)

    def run(stream) -> float:
        start, pairs = time.perf_counter(), 0
        for _ in range(batches):
            pairs += len(next(stream)["pixel_values"])
        return pairs / (time.perf_counter() - start)

    load_before = os.getloadavg()[0]
    samples = alternate({key: (lambda s=s: run(s)) for key, s in streams.items()}, runs=runs, warmup=1)
    result = {
        "dataset": name,
        "image_size": image_size,
        "pairs_per_run": batch_size * batches,
        "batch_size": batch_size,
        "ours_pairs_per_s": round(median(samples["ours"]), 2),
        "baseline_pairs_per_s": round(median(samples["baseline"]), 2),
        "ratio": round(median(samples["ours"]) / median(samples["baseline"]), 3),
        "median_of_per_round_ratios": round(median([o / b for o, b in zip(samples["ours"], samples["baseline"])]), 3),
        "crops_only_pairs_per_s": round(median(samples["crops_only"]), 2),
        "samples_pairs_per_s": {k: [round(v, 2) for v in vs] for k, vs in samples.items()},
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(result, flush=True)
    return result


def torch_interpolation(name: str):
    from torchvision.transforms import v2

    return v2.InterpolationMode(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR, help="where the parquet data sets go")
    parser.add_argument("--idx_dir", type=Path, default=IDX_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--runs", type=int, default=7, help="alternating timed runs per contender (>= 5)")
    parser.add_argument("--photo_count", type=int, default=2048, help="photo crops in the parquet data set")
    parser.add_argument("--photo_batches", type=int, default=3, help="batches of 64 per run, photos at 224 px")
    parser.add_argument("--fmnist_batches", type=int, default=6, help="batches of 256 per run, Fashion-MNIST at 32 px")
    args = parser.parse_args()
    if not (args.idx_dir / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"No Fashion-MNIST IDX files in {args.idx_dir}: apt-get install -y dataset-fashion-mnist")

    torch.set_num_threads(1)  # per core: a DataLoader worker runs torch at one thread
    fmnist = convert(args.idx_dir, args.work_dir / "fashion_mnist")
    photos = make_photo_parquet(args.work_dir / "photos" / str(args.photo_count), args.photo_count)
    photo_name = "sklearn sample photos, JPEG, short side 256 px"
    photo = measure(photo_name, photos, 224, 64, args.photo_batches, args.runs, args.photo_count)
    small = measure("Fashion-MNIST, 28x28 PNG", fmnist, 32, 256, args.fmnist_batches, args.runs, 60_000)
    stall = epoch_end_stall(photos)

    write_result(
        "data_pipeline",
        ours=photo["ours_pairs_per_s"],
        baseline=photo["baseline_pairs_per_s"],
        unit="two-view pairs/s per core (photos, 224 px)",
        higher_is_better=True,
        target="ratio >= 2 per core",
        details={
            "photos_224px": photo,
            "fashion_mnist_32px": small,
            "setup": (
                "DataLoader num_workers=0 in the main process with torch.set_num_threads(1) (a worker's setting): "
                "per core. Same stream (load_image_dataset + prepare_stream, shuffle buffer 10 000), same decode "
                "(TwoViewCollator: PIL from the parquet bytes, RGB); only the two-view transform differs. A run "
                "fetches whole batches from a stream iterator kept across runs (steady state: the shuffle buffer "
                "is filled before timing). Medians of alternating runs."
            ),
            "ours": "training.shared.augment.TwoViewTransform(image_size, config.image_mean, config.image_std, 3, bicubic)",
            "crops_only": (
                "not a contender: training.shared.augment.TwoViewCropTransform, a loader worker's share of the work under "
                "--augment_on_device (decode, two uint8 random resized crops); timed in the same alternation"
            ),
            "baseline": (
                "torchvision.transforms v1 on PIL: RandomResizedCrop(scale 0.08-1, bicubic), RandomHorizontalFlip, "
                "RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(0.2), "
                "RandomApply(GaussianBlur(k, sigma 0.1-2), p=1.0 / 0.1), RandomSolarize(128, p=0 / 0.2), "
                "ToTensor, Normalize; k = 23 at 224 px, 3 at 32 px (the 10% rule ours uses)"
            ),
            "data_dir": str(args.work_dir),
            "epoch_end_stall": {
                **stall,
                "what": (
                    "not in the timed runs (they stay inside one epoch): datasets 5.2 streams parquet through "
                    "shuffle(max_buffer_input_shards=10) -> CyclingMultiSourcesExamplesIterable, whose threads "
                    "sleep SLEEP_TIME_ON_THREADS_SHUTDOWN s when a pass ends or its iterator is closed "
                    "(apache/arrow#45214 workaround): once per epoch per loader process in the trainer"
                ),
            },
            "note": "shared 2-core machine (load averages in each data set's entry): ratios come from alternation",
        },
    )


if __name__ == "__main__":
    main()
