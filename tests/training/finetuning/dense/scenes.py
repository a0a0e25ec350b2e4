"""Tiny dense-task datasets in HF's formats, made from scikit-learn's digits pasted on a canvas,
so every box and mask is known: `image` + `annotation` (segmentation) and `image` + `objects`
with `bbox` (COCO [x, y, w, h]) and `category` (detection)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from PIL import Image

CLASSES = ["small", "large"]  # digits 0-4 and 5-9


def digit_scenes(count: int, size: int = 32, seed: int = 0) -> list[dict]:
    """`count` scenes of one or two non-overlapping digits (12 px) on a dark canvas."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        canvas = np.zeros((size, size), np.uint8)
        mask = np.zeros((size, size), np.uint8)
        boxes, categories = [], []
        for _ in range(int(rng.integers(1, 3))):
            index = int(rng.integers(len(digits.images)))
            glyph = np.asarray(Image.fromarray((digits.images[index] * 255 / 16).astype(np.uint8)).resize((12, 12)))
            x, y = (int(v) for v in rng.integers(0, size - 12, 2))
            if mask[y:y + 12, x:x + 12].any():
                continue
            on = glyph > 60
            ys, xs = np.nonzero(on)
            canvas[y:y + 12, x:x + 12] = np.maximum(canvas[y:y + 12, x:x + 12], glyph)
            category = int(digits.target[index] >= 5)
            mask[y:y + 12, x:x + 12][on] = category + 1  # 0 is the background
            boxes.append([float(x + xs.min()), float(y + ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)])
            categories.append(category)
        scenes.append({"image": Image.fromarray(canvas).convert("RGB"), "annotation": Image.fromarray(mask),
                       "objects": {"bbox": boxes, "category": categories}})
    return scenes


def save_scene_dataset(folder: Path, task: str, train: int = 24, validation: int = 8) -> Path:
    """A `save_to_disk` DatasetDict (train, validation) for `task`."""
    if task == "semantic-segmentation":
        features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    else:
        features = datasets.Features({"image": datasets.Image(), "objects": {
            "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
            "category": datasets.List(datasets.ClassLabel(names=CLASSES)),
        }})
    splits = {}
    for name, count, seed in (("train", train, 0), ("validation", validation, 1)):
        rows = [{k: v for k, v in scene.items() if k in features} for scene in digit_scenes(count, seed=seed)]
        splits[name] = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder
