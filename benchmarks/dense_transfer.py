"""Does Barlow Twins pretraining transfer to detection and segmentation? One command, CPU only.

    apt-get install -y dataset-fashion-mnist          # IDX files in /usr/share/datasets/fashion-mnist
    python benchmarks/dense_transfer.py --work_dir runs/dense
    python benchmarks/dense_transfer.py --work_dir /tmp/dense_smoke --smoke    # plumbing only, minutes

Scenes: Fashion-MNIST garments and scikit-learn digits pasted at random sizes and places on a dark
canvas (no overlaps, light noise), so every box and mask is known. Five object classes: digit,
top (T-shirt, pullover, coat, shirt, dress), trouser, footwear (sandal, sneaker, boot), bag.
Training scenes use Fashion-MNIST's training images and the first 1,400 digits; evaluation scenes
its test images and the other digits.

Steps, each a command a user would run:
1. Pretrain `barlow-pretrain` on the unlabelled training scenes (images only).
2. Fine-tune, with the same budget and seed, from the Barlow Twins encoder and from the same
   architecture randomly initialised (`--random_init`):
   `barlow-finetune --task semantic-segmentation` (UperNet) and `--task object-detection` (DETR),
   on a labelled subset of the training scenes.
3. mIoU and mAP on the evaluation scenes, from the runs' metrics.json (torchmetrics), and the
   margins Barlow minus random.

Writes benchmarks/results/dense_transfer.json (rewritten after every step, "complete": false
until the end) unless --smoke, which writes under --work_dir only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, command, machine, versions  # noqa: E402

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["digit", "top", "trouser", "footwear", "bag"]
FASHION_CLASS = {0: 1, 1: 2, 2: 1, 3: 1, 4: 1, 5: 3, 6: 1, 7: 3, 8: 4, 9: 3}  # Fashion-MNIST label -> class id
TRAIN_DIGITS = 1400
BACKBONE = ["--backbone", "resnet18", "--backbone_kwargs", '{"channels": [16, 32, 64, 128]}', "--small_image_stem"]


# -------------------------------------------------------------------------------------------- scenes
def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def object_pool(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Fashion-MNIST images, their class ids, digit images) of one split, as uint8 arrays."""
    from sklearn.datasets import load_digits

    prefix = "train" if split == "train" else "t10k"
    garments = read_idx(IDX_DIR / f"{prefix}-images-idx3-ubyte.gz")
    classes = np.vectorize(FASHION_CLASS.get)(read_idx(IDX_DIR / f"{prefix}-labels-idx1-ubyte.gz"))
    digits = (load_digits().images * 255 / 16).astype(np.uint8)
    digits = digits[:TRAIN_DIGITS] if split == "train" else digits[TRAIN_DIGITS:]
    return garments, classes, digits


def make_scenes(count: int, split: str, size: int, seed: int) -> list[dict]:
    """`count` scenes of 1 to 3 objects: RGB image, mask (0 background, 1 + class id) and objects."""
    from PIL import Image

    garments, classes, digits = object_pool(split)
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        canvas = np.zeros((size, size), np.float32)
        mask = np.zeros((size, size), np.uint8)
        boxes, categories = [], []
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.35:
                glyph, category, side = digits[rng.integers(len(digits))], 0, int(rng.integers(size // 4, size // 3 + 1))
            else:
                index = int(rng.integers(len(garments)))
                glyph, category, side = garments[index], int(classes[index]), int(rng.integers(size // 3, size // 2 + 1))
            pixels = np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BILINEAR), np.float32)
            on = pixels > 40
            for _attempt in range(20):
                x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
                if not mask[max(0, y - 1):y + side + 1, max(0, x - 1):x + side + 1].any():
                    break
            else:
                continue  # no free place left
            ys, xs = np.nonzero(on)
            if ys.size == 0:
                continue
            canvas[y:y + side, x:x + side] = np.where(on, pixels, canvas[y:y + side, x:x + side])
            mask[y:y + side, x:x + side][on] = category + 1
            boxes.append([float(x + xs.min()), float(y + ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)])
            categories.append(category)
        noisy = np.clip(canvas + rng.normal(0, 6, canvas.shape), 0, 255).astype(np.uint8)
        scenes.append({"image": Image.fromarray(noisy).convert("RGB"), "annotation": Image.fromarray(mask),
                       "objects": {"bbox": boxes, "category": categories}})
    return scenes


def write_datasets(work: Path, args) -> dict[str, Path]:
    """save_to_disk folders: unlabelled (train scenes' images), segmentation and detection
    (train: the first --labelled train scenes; validation: the evaluation scenes)."""
    import datasets

    folders = {name: work / name for name in ("unlabelled", "segmentation", "detection")}
    if all((f / "dataset_dict.json").exists() for f in folders.values()):
        return folders
    train = make_scenes(args.scenes, "train", args.size, seed=args.seed)
    held_out = make_scenes(args.eval_scenes, "test", args.size, seed=args.seed + 1)
    image = datasets.Image()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [s["image"] for s in train]}, features=datasets.Features({"image": image}))
    }).save_to_disk(str(folders["unlabelled"]))
    segmentation = datasets.Features({"image": image, "annotation": datasets.Image()})
    detection = datasets.Features({"image": image, "objects": {
        "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
        "category": datasets.List(datasets.ClassLabel(names=CLASSES)),
    }})
    for name, features in (("segmentation", segmentation), ("detection", detection)):
        splits = {
            split: datasets.Dataset.from_list([{k: s[k] for k in features} for s in scenes], features=features)
            for split, scenes in (("train", train[:args.labelled]), ("validation", held_out))
        }
        datasets.DatasetDict(splits).save_to_disk(str(folders[name]))
    return folders


# ------------------------------------------------------------------------------------------- steps
def run(args_list: list[str], log: Path) -> float:
    """Run a console script of this project, its output in `log`; seconds it took."""
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as output:
        print("$", shlex.join(args_list), file=output, flush=True)
        done = subprocess.run(args_list, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{args_list[0]} failed (status {done.returncode}); see {log}")
    return time.perf_counter() - started


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def pretrain(args, folders: dict[str, Path], work: Path) -> tuple[Path, float]:
    out = work / "pretrained"
    if (out / "metrics.json").exists():
        return out, json.loads((out / "metrics.json").read_text()).get("wall_time_s", 0.0)
    seconds = run([
        script("barlow-pretrain"), "--dataset_name", str(folders["unlabelled"]), "--no_streaming", "--output_dir", str(out),
        *BACKBONE, "--image_size", str(args.pretrain_size), "--channels_last", "--projector_dims", *args.projector_dims.split(),
        "--per_device_train_batch_size", str(args.pretrain_batch_size), "--num_train_epochs", str(args.pretrain_epochs),
        "--warmup_epochs", str(min(2, args.pretrain_epochs / 4)), "--min_crop_scale", "0.2", "--blur_probability", "0", "0",
        "--logging_steps", "10", "--seed", str(args.seed), "--dataloader_num_workers", str(args.workers),
        "--config", str(REPO_ROOT / "benchmarks/configs/fmnist_small_image.yaml"),
    ], work / "pretrain.log")
    return out, seconds


TASKS = {
    "segmentation": ("semantic-segmentation", "mean_iou"),
    "detection": ("object-detection", "map"),
}


def finetune(args, task: str, folders: dict[str, Path], encoder: Path, work: Path, random_init: bool) -> dict:
    name = f"{task}_{'random' if random_init else 'barlow'}"
    out = work / name
    if not (out / "metrics.json").exists():
        cli_task, _ = TASKS[task]
        head = args.detr_config if task == "detection" else args.upernet_config
        stages = [] if task == "detection" else ["--out_indices", *args.upernet_out_indices.split()]
        epochs = args.detection_epochs if task == "detection" else args.segmentation_epochs
        run([
            script("barlow-finetune"), "--task", cli_task, "--model_name_or_path", str(encoder),
            "--dataset_name", str(folders[task]), "--no_streaming", "--output_dir", str(out), "--overwrite_output_dir",
            "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(args.finetune_batch_size),
            "--learning_rate", str(args.backbone_learning_rate), "--head_learning_rate", str(args.head_learning_rate),
            "--image_size", str(args.size), "--warmup_epochs", "1", "--min_crop_scale", "0.6", "--head_config", head,
            "--seed", str(args.seed), *stages,
            "--dataloader_num_workers", str(args.workers), "--logging_steps", "10",
            *(["--random_init"] if random_init else []),
        ], work / f"{name}.log")
    return json.loads((out / "metrics.json").read_text())


# -------------------------------------------------------------------------------------------- main
def cpu_flags() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"lscpu_model": fields.get("Model name", "").strip(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": any(f.startswith("amx") for f in flags)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True, help="Datasets, models and logs go here.")
    parser.add_argument("--size", type=int, default=48, help="Scene side in pixels.")
    parser.add_argument("--scenes", type=int, default=3000, help="Training scenes (all unlabelled for pretraining).")
    parser.add_argument("--labelled", type=int, default=400, help="Training scenes with labels for fine-tuning.")
    parser.add_argument("--eval_scenes", type=int, default=300, help="Evaluation scenes.")
    parser.add_argument("--pretrain_epochs", type=float, default=10)
    parser.add_argument("--pretrain_size", type=int, default=32,
                        help="Side of the pretraining views (random resized crops of the scenes).")
    parser.add_argument("--pretrain_batch_size", type=int, default=128)
    parser.add_argument("--projector_dims", default="1024 1024 1024", help="Projector widths, space-separated.")
    parser.add_argument("--segmentation_epochs", type=float, default=12)
    parser.add_argument("--detection_epochs", type=float, default=150,
                        help="DETR needs long schedules: at 30 epochs neither initialisation had started to detect.")
    parser.add_argument("--finetune_batch_size", type=int, default=16)
    parser.add_argument("--backbone_learning_rate", type=float, default=1e-4)
    parser.add_argument("--head_learning_rate", type=float, default=5e-4)
    parser.add_argument("--detr_config", default='{"num_queries": 10, "d_model": 64, "encoder_layers": 2, '
                        '"decoder_layers": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_attention_heads": 4, '
                        '"decoder_attention_heads": 4, "dropout": 0.0, "auxiliary_loss": true}',
                        help="DetrConfig settings (JSON); auxiliary_loss supervises every decoder layer, which speeds DETR up.")
    parser.add_argument("--upernet_config", default='{"hidden_size": 32, "auxiliary_channels": 16, "use_auxiliary_head": false}')
    parser.add_argument("--upernet_out_indices", default="2 3 4",
                        help="Backbone stages UperNet reads (with the small-image stem: strides 2, 4 and 8).")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per run.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, results under --work_dir only.")
    args = parser.parse_args()
    if args.smoke:
        args.scenes, args.labelled, args.eval_scenes = 64, 32, 16
        args.pretrain_epochs, args.segmentation_epochs, args.detection_epochs = 1, 1, 1
        args.projector_dims, args.pretrain_batch_size = "64 64", 32
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result_path = (work / "dense_transfer.json") if args.smoke else RESULTS_DIR / "dense_transfer.json"
    record = {
        "name": "dense_transfer", "complete": False, "command": command(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {**machine(), **cpu_flags()},
        "versions": versions(), "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "budget": {k: v for k, v in vars(args).items() if k not in ("work_dir", "smoke")}, "wall_time_s": {},
        "tasks": {},
    }

    def save() -> None:
        record["load_average_now"] = [round(v, 2) for v in os.getloadavg()]
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(record, indent=2) + "\n")

    started = time.perf_counter()
    folders = write_datasets(work, args)
    record["wall_time_s"]["datasets"] = round(time.perf_counter() - started, 1)
    encoder, seconds = pretrain(args, folders, work)
    record["wall_time_s"]["pretrain"] = round(seconds, 1)
    pretrain_log = [json.loads(line) for line in (encoder / "log_history.jsonl").read_text().splitlines()]
    record["pretrain"] = {"first_loss": pretrain_log[0].get("train_loss"), "last_loss": pretrain_log[-1].get("train_loss"),
                          "steps": pretrain_log[-1].get("step")}
    save()
    for task, (_, metric) in TASKS.items():
        entry = {"metric": metric}
        for init in ("barlow", "random"):
            begun = time.perf_counter()
            metrics = finetune(args, task, folders, encoder, work, random_init=init == "random")
            # A run finished by an earlier invocation reports its own time.
            record["wall_time_s"][f"{task}_{init}"] = metrics.get("wall_time_s", round(time.perf_counter() - begun, 1))
            entry[init] = metrics[f"eval_{metric}"]
            entry[f"{init}_all"] = {k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_split"}
            entry[f"{init}_history"] = [h[f"eval_{metric}"] for h in metrics["history"]]
            record["tasks"][task] = entry
            save()
        entry["margin"] = round(entry["barlow"] - entry["random"], 4)
        entry["barlow_above_random"] = entry["barlow"] > entry["random"]
        save()
    record["complete"] = True
    record["wall_time_s"]["total"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(record["tasks"], indent=2))
    print(f"Wrote {result_path}")


if __name__ == "__main__":
    main()
