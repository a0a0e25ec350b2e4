"""The real-data result: Barlow Twins on Fashion-MNIST, evaluated, against baselines, in one command.

    apt-get install -y dataset-fashion-mnist          # IDX files in /usr/share/datasets/fashion-mnist
    python benchmarks/fashion_mnist.py --work_dir runs/fmnist --pretrain_epochs 30
    python benchmarks/fashion_mnist.py --work_dir /tmp/fm --gpu --pretrain_time_budget_s 200   # on a GPU

Steps:
1. Convert the IDX files into parquet shards of a `datasets` dataset (image and label columns).
2. Pretrain with barlow-pretrain (ResNet-18 with a small-image stem at 32 px by default).
3. Evaluate with barlow-eval: linear probe, kNN, and 1% / 10% semi-supervised fine-tuning.
4. Baselines in the same run: logistic regression on raw pixels, a linear probe on the same
   backbone randomly initialised, and supervised training from scratch with the same epochs.

Writes benchmarks/results/fashion_mnist.json (accuracies as fractions) unless --smoke, which runs
every step on a few hundred images to check the plumbing and writes only under --work_dir. The file
is rewritten after every step ("complete": false until the end), so a run cut short keeps what it did.

--pretrain_time_budget_s picks the epochs: a 40-step calibration run measures images/s, and the
run gets the epochs that fit the budget (the supervised baseline gets the same epochs). --gpu
turns on bf16, channels-last and on-device augmentation for pretraining; every step's loader gets
all cores but two (and but 4 more while the raw-pixel baseline runs beside it).

--steps runs some of the steps; the others' results already in --results are kept, so a run can
be split over two sessions or two device calls (the work dir must carry the pretrained model):

    python benchmarks/fashion_mnist.py ... --steps pretrain evaluate random_init_linear
    python benchmarks/fashion_mnist.py ... --steps supervised_scratch raw_pixel_logreg

On a CPU, pretraining can outlast a sitting. --checkpointing_steps N saves a checkpoint every N
steps, and the same command run again resumes from the latest one in WORK_DIR/pretrained (the
epochs must then come from --pretrain_epochs); pretrain_metrics.total_wall_time_s adds the parts
up. --fast_cpu pretrains channels-last and compiled, as the README advises for CPUs:

    python benchmarks/fashion_mnist.py --work_dir W --image_size 28 --backbone_kwargs \
        '{"channels": [16, 32, 64, 128]}' --fast_cpu --checkpointing_steps 117 --steps pretrain

Optimiser: configs/fmnist_small_image.yaml by default (LARS with larger steps than the paper's
ImageNet settings, chosen on the CPU: benchmarks/RESULTS.md); --pretrain_config '' gives the paper's.

Augmentation: the paper's two views without the Gaussian blur (--blur_probability 0 0), as
small-image recipes run them (lightly's and solo-learn's CIFAR-10 settings): a 3 x 3 blur with
sigma up to 2 on a 28 px garment erases most of what tells a shirt from a pullover.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import gzip
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results" / "fashion_mnist.json"
SMALL_IMAGE_CONFIG = Path(__file__).resolve().parent / "configs" / "fmnist_small_image.yaml"
STEPS = ("pretrain", "evaluate", "random_init_linear", "supervised_scratch", "raw_pixel_logreg")
# What each step writes into the results; a step that runs again replaces its own keys only.
STEP_KEYS = {
    "pretrain": ("epochs", "calibration_images_per_second", "pretrain_metrics", "linear_top1", "knn_top1",
                 "semi_1pct_top1", "semi_10pct_top1", "random_init_linear_top1", "supervised_scratch_top1"),
    "evaluate": ("linear_top1", "knn_top1", "semi_1pct_top1", "semi_10pct_top1"),
    "random_init_linear": ("random_init_linear_top1",),
    "supervised_scratch": ("supervised_scratch_top1",),
    "raw_pixel_logreg": ("raw_pixel_logreg_top1",),
}
RAW_PIXEL_THREADS = 4
NEEDS_PRETRAINED = {"evaluate", "random_init_linear", "supervised_scratch"}  # its weights, architecture or epochs
RESULT_KEYS = ("linear_top1", "knn_top1", "semi_1pct_top1", "semi_10pct_top1", "raw_pixel_logreg_top1",
               "random_init_linear_top1", "supervised_scratch_top1")
TARGETS = {"linear_top1": 0.90, "knn_top1": 0.88}  # issue #4's
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


def _pixels(data_dir: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(images flattened to (N, 784) float32, labels) of one split of the parquet shards."""
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(data_dir / f"{split}-*.parquet"), split="train")
    if limit:
        table = table.select(range(min(limit, len(table))))
    images = np.stack([np.asarray(image, dtype=np.float32).reshape(-1) for image in table["image"]])
    return images, np.asarray(table["label"])


def raw_pixel_logistic_regression(data_dir: Path, max_train: int | None, threads: int = 4) -> float:
    """Logistic regression on standardised raw pixels, read from the same parquet shards as the rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    x_train, y_train = _pixels(data_dir, "train", max_train)
    x_test, y_test = _pixels(data_dir, "test", None)
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_test), y_test))


def _pretrain_args(args, data: Path, output_dir: Path, epochs: str, speed: list[str], cap: list[str]) -> list[str]:
    return [
        "--dataset_name", str(data), "--no_streaming", "--output_dir", str(output_dir),
        "--backbone", "resnet18", "--backbone_kwargs", args.backbone_kwargs, "--small_image_stem",
        "--image_size", str(args.image_size),
        "--projector_dims", *map(str, args.projector_dims), "--per_device_train_batch_size", str(args.batch_size),
        "--num_train_epochs", epochs, "--warmup_epochs", "1" if args.smoke else "2", "--logging_steps", "20",
        "--blur_probability", *(str(p) for p in args.blur_probability), "--min_crop_scale", str(args.min_crop_scale),
        "--seed", str(args.seed), *speed, *(cap[:2]),
        *(["--config", str(args.pretrain_config)] if args.pretrain_config else []),
    ]


def calibrated_epochs(args, data: Path, speed: list[str], num_examples: int) -> tuple[int, float]:
    """Epochs that fit --pretrain_time_budget_s, from the images/s of a 40-step run (and that rate)."""
    from training.pretrain import main as pretrain

    out = args.work_dir / "calibration"
    steps, window = ("4", "2") if args.smoke else ("40", "10")
    pretrain([*_pretrain_args(args, data, out, "1", speed, []), "--max_train_steps", steps, "--warmup_steps", "2",
              "--logging_steps", window, "--overwrite_output_dir"])
    windows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()][1:]
    rate = float(np.median([w["images_per_second"] for w in windows]))
    # 15% for what the calibration does not see: loader restarts at epoch ends, the final save.
    epochs = int(args.pretrain_time_budget_s * rate * 0.85 // num_examples)
    return max(1, epochs), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idx_dir", type=Path, default=IDX_DIR, help="where the Fashion-MNIST IDX files are")
    parser.add_argument("--work_dir", type=Path, required=True, help="data, models and evaluation outputs")
    parser.add_argument("--data_dir", type=Path, help="parquet shards (made from --idx_dir if absent; default WORK_DIR/data)")
    parser.add_argument("--pretrain_epochs", type=int, default=30, help="pretraining epochs (also the supervised baseline's)")
    parser.add_argument("--pretrain_time_budget_s", type=float, help="choose the epochs that fit this many seconds")
    parser.add_argument("--backbone_kwargs", default='{"channels": [32, 64, 128, 256]}', help="timm ResNet-18 arguments")
    parser.add_argument("--image_size", type=int, default=32, help="the backbone's input (Fashion-MNIST is 28 px)")
    parser.add_argument("--projector_dims", type=int, nargs="+", default=[2048, 2048, 2048])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--blur_probability", type=float, nargs=2, default=[0.0, 0.0], metavar=("VIEW1", "VIEW2"),
                        help="Gaussian blur odds per view in pretraining (the paper's 224 px recipe: 1.0 0.1)")
    parser.add_argument("--min_crop_scale", type=float, default=0.08,
                        help="smallest area fraction of the pretraining crops (the paper's 0.08)")
    parser.add_argument("--pretrain_config", type=lambda value: Path(value) if value else None, default=SMALL_IMAGE_CONFIG,
                        help="a barlow-pretrain --config file (YAML or JSON) for the other pretraining options, e.g. "
                             "the optimiser's; this script's own options win over it. Default: configs/"
                             "fmnist_small_image.yaml, the settings of the recorded result; '' for the paper's")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="the steps to run (calibration goes with pretrain); results of the others in --results stay")
    parser.add_argument("--gpu", action="store_true",
                        help="bf16, channels-last, on-device augmentation; loader workers on all cores but two")
    parser.add_argument("--fast_cpu", action="store_true",
                        help="pretrain channels-last and compiled (the README's CPU fast path); every step's loader "
                             "gets one worker")
    parser.add_argument("--checkpointing_steps", type=int,
                        help="save a pretraining checkpoint every N steps; run the same command again and pretraining "
                             "resumes from the latest one in WORK_DIR/pretrained (a run longer than one sitting)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results JSON to write")
    parser.add_argument("--smoke", action="store_true", help="a few hundred images, one epoch: checks the plumbing only")
    args = parser.parse_args()
    if args.gpu and args.fast_cpu:
        parser.error("--gpu and --fast_cpu are two machines' settings: give one.")
    pretrain_config = _read_pretrain_config(args.pretrain_config)
    data = args.data_dir or args.work_dir / "data"
    if not any(data.glob("train-*.parquet")) and not (args.idx_dir / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"No Fashion-MNIST IDX files in {args.idx_dir}: apt-get install -y dataset-fashion-mnist")
    destination = args.work_dir / "fashion_mnist.json" if args.smoke else args.results
    started = time.perf_counter()
    # The raw-pixel baseline needs only the CPU: it runs beside the GPU steps, in its own process.
    convert(args.idx_dir, data)
    background = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    if "raw_pixel_logreg" in args.steps:
        raw_future = background.submit(raw_pixel_logistic_regression, data, 512 if args.smoke else None, RAW_PIXEL_THREADS)

    from training.shared.checkpointing import find_latest_checkpoint
    from training.evaluate import main as evaluate_main
    from training.finetune import main as finetune_main
    from training.pretrain import main as pretrain_main

    def returning(command, result_file: str):
        """A command that returns the JSON it wrote; a rerun replaces its earlier output (a resumed
        pretraining keeps its checkpoints)."""
        def run(argv: list[str]) -> dict:
            if "--resume_from_checkpoint" not in argv:
                argv = [*argv, "--overwrite_output_dir"]
            command(argv)
            return json.loads((Path(argv[argv.index("--output_dir") + 1]) / result_file).read_text())
        return run

    evaluate, finetune = returning(evaluate_main, "eval_results.json"), returning(finetune_main, "metrics.json")
    pretrain = returning(pretrain_main, "metrics.json")

    cap = ["--max_train_samples", "512", "--max_eval_samples", "256"] if args.smoke else []
    # Loader workers decode and crop on the CPU: every core but two (the training process's) and
    # but the raw-pixel baseline's threads while it runs beside them.
    workers = str(max(8, (os.cpu_count() or 8) - 2 - (RAW_PIXEL_THREADS if "raw_pixel_logreg" in args.steps else 0)))
    speed = ["--mixed_precision", "bf16", "--channels_last", "--augment_on_device", "--dataloader_num_workers", workers] if args.gpu else []
    eval_speed = ["--mixed_precision", "bf16", "--dataloader_num_workers", workers, "--per_device_eval_batch_size", "1024"] if args.gpu else []
    if args.fast_cpu:  # one loader worker beside the process that computes
        speed = ["--channels_last", "--torch_compile", "--dataloader_num_workers", "1"]
        eval_speed = ["--dataloader_num_workers", "1"]
    command = "python benchmarks/fashion_mnist.py " + shlex.join(sys.argv[1:])
    record = _earlier_record(destination, args.steps)
    if "pretrain" in args.steps:  # what describes the pretrained model comes from the run that made it
        record.update({
            "backbone": f"resnet18 {args.backbone_kwargs}, small-image stem, {args.image_size} px",
            "projector_dims": args.projector_dims, "batch_size": args.batch_size,
            "augmentation": f"the paper's two views, blur probabilities {args.blur_probability[0]} / "
                            f"{args.blur_probability[1]}, crop scale {args.min_crop_scale}-1",
            "pretrain_config": pretrain_config,
        })
    record.update({"smoke": args.smoke, "date": time.strftime("%Y-%m-%d"), "complete": False})
    redone = set(args.steps) | ({"calibration"} if "pretrain" in args.steps else set())
    record["errors"] = {k: v for k, v in record.get("errors", {}).items() if k not in redone}
    record.setdefault("commands", {}).update({name: command for name in args.steps})
    record.setdefault("hardware_by_step", {}).update({name: _hardware() for name in args.steps})
    record["hardware"] = "; ".join(dict.fromkeys(record["hardware_by_step"].values()))
    record["command"] = " && ".join(dict.fromkeys(record["commands"].values()))
    earlier_seconds = record.pop("wall_time_s", 0.0)  # 0 unless an earlier run did other steps

    def save() -> None:
        record["wall_time_s"] = round(earlier_seconds + time.perf_counter() - started, 1)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(json.dumps(record, indent=2) + "\n")

    def step(name: str, fn):
        """Run one step; a failure is recorded and the next steps still run."""
        step_start = time.perf_counter()
        try:
            return fn()
        except BaseException as error:  # noqa: BLE001 - SystemExit from a CLI included
            if isinstance(error, KeyboardInterrupt):
                raise
            record["errors"][name] = f"{type(error).__name__}: {error}"[-2000:]
            return None
        finally:
            record.setdefault("step_seconds", {})[name] = round(time.perf_counter() - step_start, 1)
            save()

    pretrained = args.work_dir / "pretrained"
    if "pretrain" in args.steps:
        epochs = args.pretrain_epochs
        checkpointing = ["--checkpointing_steps", str(args.checkpointing_steps)] if args.checkpointing_steps else []
        if checkpointing and find_latest_checkpoint(pretrained) is not None:
            if args.pretrain_time_budget_s:  # a new calibration could choose other epochs than the schedule's
                sys.exit(f"{pretrained} holds checkpoints to resume: give --pretrain_epochs, not --pretrain_time_budget_s.")
            checkpointing += ["--resume_from_checkpoint", "latest"]
        if args.pretrain_time_budget_s:
            calibration = step("calibration", lambda: calibrated_epochs(args, data, speed, 60_000))
            if calibration:
                epochs, record["calibration_images_per_second"] = calibration[0], round(calibration[1], 1)
        record["epochs"] = 1 if args.smoke else epochs
        step("pretrain", lambda: record.update(pretrain_metrics=pretrain(
            _pretrain_args(args, data, pretrained, str(record["epochs"]), speed, cap) + checkpointing)))
    elif set(args.steps) & NEEDS_PRETRAINED and (not (pretrained / "config.json").is_file() or "epochs" not in record):
        sys.exit(f"--steps {' '.join(sorted(set(args.steps) & NEEDS_PRETRAINED))} without pretrain needs the "
                 f"pretrained model in {pretrained} and its epochs in {destination}.")
    epochs = record.get("epochs")
    common_eval = ["--dataset_name", str(data), "--no_streaming", "--eval_split", "test", *cap, *eval_speed]

    def ssl_eval():
        results = evaluate([
            *common_eval, "--model_name_or_path", str(pretrained), "--output_dir", str(args.work_dir / "eval"),
            "--protocol", "linear", "knn", "semi", "--label_fraction", "0.01", "0.1", "--knn_k", "20",
            *(["--linear_epochs", "2", "--semi_epochs", "1"] if args.smoke else []),
        ])
        for key in ("linear_top1", "knn_top1", "semi_1pct_top1", "semi_10pct_top1"):
            record[key] = results[key]

    if "evaluate" in args.steps:
        step("evaluate", ssl_eval)
    if "random_init_linear" in args.steps:
        step("random_init_linear", lambda: record.update(random_init_linear_top1=evaluate([
            *common_eval, "--model_name_or_path", str(pretrained), "--random_init",
            "--output_dir", str(args.work_dir / "eval_random"), "--protocol", "linear",
            *(["--linear_epochs", "2"] if args.smoke else []),
        ])["linear_top1"]))
    if "supervised_scratch" in args.steps:
        step("supervised_scratch", lambda: record.update(supervised_scratch_top1=finetune([
            "--dataset_name", str(data), "--no_streaming", "--eval_split", "test", *cap, *eval_speed,
            "--model_name_or_path", str(pretrained), "--random_init", "--output_dir", str(args.work_dir / "supervised"),
            "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(args.batch_size),
            # From scratch, not fine-tuning: the usual supervised recipe (SGD 0.1, weight decay 5e-4, cosine).
            "--learning_rate", "0.1", "--head_learning_rate", "0.1", "--weight_decay", "5e-4",
        ])["eval_top1"]))
    if "raw_pixel_logreg" in args.steps:
        step("raw_pixel_logreg", lambda: record.update(raw_pixel_logreg_top1=raw_future.result()))
    background.shutdown()
    missing = [key for key in RESULT_KEYS if key not in record]
    record["complete"] = not record["errors"] and not missing
    record.update(targets_record(record))
    save()
    print(json.dumps(record, indent=2))
    print(f"Wrote {destination}" + (f"; still missing {', '.join(missing)}" if missing else ""))


def targets_record(record: dict) -> dict:
    """The targets, and which of them the record's accuracies meet (a missing accuracy meets none)."""
    return {"targets": TARGETS, "targets_met": {key: record.get(key, -1.0) >= target for key, target in TARGETS.items()}}


def _earlier_record(path: Path, steps: list[str]) -> dict:
    """What an earlier run of the other steps left in ``path``, minus what these steps will redo."""
    if set(steps) == set(STEPS) or not path.is_file():
        return {"errors": {}}
    record = json.loads(path.read_text())
    redone = {key for step in steps for key in STEP_KEYS[step]}
    return {key: value for key, value in record.items() if key not in redone}


def _read_pretrain_config(path: Path | None) -> dict:
    """The --pretrain_config options, to record with the results (barlow-pretrain checks their names)."""
    if path is None:
        return {}
    from barlow_cli import read_config_file

    try:
        return read_config_file(path)
    except ValueError as error:
        sys.exit(f"--pretrain_config: {error}")


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    from common import machine  # benchmarks/common.py, beside this script

    return f"CPU ({machine()['cpu']}), {os.cpu_count()} cores; torch {torch.__version__}"


if __name__ == "__main__":
    main()
