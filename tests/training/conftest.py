"""Datasets on disk for the pretraining tests (digits from scikit-learn, no downloads)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from tests.training.pretraining_inputs import digit_images


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    """47 digits as PNG files in class subfolders, plus one corrupt file: 3 batches of 16."""
    root = tmp_path_factory.mktemp("imagefolder")
    for index, (image, label) in enumerate(digit_images(47)):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{index}.png")
    (root / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory) -> Path:
    """96 digits (RGB, column "img", labels "digit") in 4 parquet shards: 6 batches of 16."""
    root = tmp_path_factory.mktemp("parquet")
    pairs = digit_images(96)
    table = datasets.Dataset.from_dict({"img": [p[0].convert("RGB") for p in pairs], "digit": [p[1] for p in pairs]})
    table = table.cast_column("img", datasets.Image())
    for shard in range(4):
        table.shard(4, shard).to_parquet(str(root / f"train-{shard:05d}.parquet"))
    return root
