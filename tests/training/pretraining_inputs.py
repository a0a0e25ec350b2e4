"""What the pretraining tests share: a tiny network's options, digit images, the logged history."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

TINY = [
    "--backbone", "resnet18", "--backbone_kwargs", '{"channels": [8, 16, 16, 32]}', "--small_image_stem",
    "--image_size", "16", "--projector_dims", "64", "64", "--per_device_train_batch_size", "16",
    "--warmup_steps", "1", "--logging_steps", "1", "--shuffle_buffer_size", "64", "--seed", "3",
]


def digit_images(count: int) -> list[tuple[Image.Image, int]]:
    """The first ``count`` of scikit-learn's digits as 24 px grey images, with their labels."""
    digits = load_digits()
    return [
        (Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((24, 24)), int(digits.target[i]))
        for i in range(count)
    ]


def history(output_dir: Path) -> list[dict]:
    """The entries of a run's log_history.jsonl."""
    return [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]
