"""The real-data result: Barlow Twins on Fashion-MNIST, evaluated, against baselines, in one command.

    apt-get install -y dataset-fashion-mnist          # IDX files in /usr/share/datasets/fashion-mnist
    python benchmarks/fashion_mnist.py --work_dir runs/fmnist --pretrain_epochs 30

Steps:
1. Convert the IDX files into parquet shards of a `datasets` dataset (image and label columns).
2. Pretrain with barlow-pretrain (ResNet-18 with a small-image stem at 32 px by default).
3. Evaluate with barlow-eval: linear probe, kNN, and 1% / 10% semi-supervised fine-tuning.
4. Baselines in the same run: logistic regression on raw pixels, a linear probe on the same
   backbone randomly initialised, and supervised training from scratch with the same epochs.

Writes benchmarks/results/fashion_mnist.json (accuracies as fractions) unless --smoke, which runs
every step on a few hundred images to check the plumbing and writes only under --work_dir.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results" / "fashion_mnist.json"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array: magic, dims, then big-endian uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def convert(idx_dir: Path, out_dir: Path, shards: int = 8) -> Path:
    """Parquet shards `train-0000i.parquet` and `test-0000i.parquet` that load_dataset(out_dir) reads."""
    import datasets
    from PIL import Image

    if any(out_dir.glob("train-*.parquet")):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz")
        table = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()}, features=features
        )
        count = shards if split == "train" else 2
        for index in range(count):
            table.shard(count, index).to_parquet(str(out_dir / f"{split}-{index:05d}.parquet"))
    return out_dir


def raw_pixel_logistic_regression(idx_dir: Path, max_train: int | None) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train = read_idx(idx_dir / "train-images-idx3-ubyte.gz").reshape(-1, 784)[:max_train].astype(np.float32)
    y_train = read_idx(idx_dir / "train-labels-idx1-ubyte.gz")[:max_train]
    x_test = read_idx(idx_dir / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32)
    y_test = read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz")
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_test), y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idx_dir", type=Path, default=IDX_DIR, help="where the Fashion-MNIST IDX files are")
    parser.add_argument("--work_dir", type=Path, required=True, help="data, models and evaluation outputs")
    parser.add_argument("--pretrain_epochs", type=int, default=30, help="pretraining epochs (also the supervised baseline's)")
    parser.add_argument("--backbone_kwargs", default='{"channels": [32, 64, 128, 256]}', help="timm ResNet-18 arguments")
    parser.add_argument("--projector_dims", default="2048-2048-2048")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a few hundred images, one epoch: checks the plumbing only")
    args = parser.parse_args()
    if not (args.idx_dir / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"No Fashion-MNIST IDX files in {args.idx_dir}: apt-get install -y dataset-fashion-mnist")

    from training.evaluate import main as evaluate
    from training.finetune import main as finetune
    from training.pretrain import main as pretrain

    started = time.perf_counter()
    data = convert(args.idx_dir, args.work_dir / "data")
    cap = ["--max_train_samples", "512", "--max_eval_samples", "256"] if args.smoke else []
    epochs = "1" if args.smoke else str(args.pretrain_epochs)
    model = ["--backbone", "resnet18", "--backbone_kwargs", args.backbone_kwargs, "--small_image_stem", "--image_size", "32"]
    pretrain_args = [
        "--dataset_name", str(data), "--output_dir", str(args.work_dir / "pretrained"), *model,
        "--projector_dims", args.projector_dims, "--per_device_train_batch_size", str(args.batch_size),
        "--num_train_epochs", epochs, "--warmup_epochs", "1" if args.smoke else "2", "--logging_steps", "50",
        *(cap[:2]),
    ]
    pretrain(pretrain_args)
    common_eval = ["--dataset_name", str(data), "--eval_split", "test", *cap]
    results = evaluate([
        *common_eval, "--model_name_or_path", str(args.work_dir / "pretrained"), "--output_dir", str(args.work_dir / "eval"),
        "--protocol", "linear", "knn", "semi", "--label_fraction", "0.01", "0.1", "--knn_k", "20",
        *(["--linear_epochs", "2", "--semi_epochs", "1"] if args.smoke else []),
    ])
    random_init = evaluate([
        *common_eval, "--model_name_or_path", str(args.work_dir / "pretrained"), "--random_init",
        "--output_dir", str(args.work_dir / "eval_random"), "--protocol", "linear",
        *(["--linear_epochs", "2"] if args.smoke else []),
    ])
    supervised = finetune([
        "--dataset_name", str(data), "--eval_split", "test", *cap, "--model_name_or_path", str(args.work_dir / "pretrained"),
        "--random_init", "--output_dir", str(args.work_dir / "supervised"), "--num_train_epochs", epochs,
        "--per_device_train_batch_size", str(args.batch_size),
    ])
    raw = raw_pixel_logistic_regression(args.idx_dir, 512 if args.smoke else None)

    import torch

    record = {
        "linear_top1": results["linear_top1"],
        "knn_top1": results["knn_top1"],
        "semi_1pct_top1": results["semi_1pct_top1"],
        "semi_10pct_top1": results["semi_10pct_top1"],
        "raw_pixel_logreg_top1": raw,
        "random_init_linear_top1": random_init["linear_top1"],
        "supervised_scratch_top1": supervised["eval_top1"],
        "backbone": f"resnet18 {args.backbone_kwargs}, small-image stem, 32 px",
        "projector_dims": args.projector_dims,
        "epochs": int(epochs),
        "hardware": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "wall_time_s": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/fashion_mnist.py " + shlex.join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
    }
    destination = args.work_dir / "fashion_mnist.json" if args.smoke else RESULTS
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"Wrote {destination}")


if __name__ == "__main__":
    main()
