"""Models and data on disk for the embedding tests: tiny encoders, digit images, no downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from tests.training.pretraining_inputs import digit_images

BIN = Path(sys.executable).parent
TINY_BARLOW = {"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 16, 16, 32]}, "projector_dims": [16, 16],
               "image_size": 32, "small_image_stem": True}


def run_cli(name: str, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an installed console script as a user does: offline, one thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def info(folder: Path) -> dict:
    return json.loads((folder / "embedding_info.json").read_text())


def save_barlow_encoder(folder: Path, seed: int = 0) -> Path:
    from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, create_image_processor

    torch.manual_seed(seed)
    config = BarlowTwinsConfig(**TINY_BARLOW)
    BarlowTwinsForPreTraining(config).save_pretrained(folder)
    create_image_processor(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def barlow_model(tmp_path_factory) -> Path:
    return save_barlow_encoder(tmp_path_factory.mktemp("barlow_model"))


@pytest.fixture(scope="session")
def other_barlow_model(tmp_path_factory) -> Path:
    return save_barlow_encoder(tmp_path_factory.mktemp("other_model"), seed=1)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """30 digits as PNG files in class subfolders, one exact copy (a duplicate), one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    for index, (image, label) in enumerate(digit_images(30)):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{index}.png")
    (root / "0" / "0-copy.png").write_bytes((root / "0" / "0.png").read_bytes())
    (root / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@pytest.fixture(scope="session")
def parquet_folder(tmp_path_factory) -> Path:
    """96 digits (RGB, column "img", labels "digit", a "note" column) in 4 parquet files."""
    root = tmp_path_factory.mktemp("parquet")
    pairs = digit_images(96)
    table = datasets.Dataset.from_dict({
        "img": [image.convert("RGB") for image, _ in pairs], "digit": [label for _, label in pairs],
        "note": [f"row {i}" for i in range(len(pairs))],
    }).cast_column("img", datasets.Image())
    for shard in range(4):
        table.shard(4, shard).to_parquet(str(root / f"train-{shard:05d}.parquet"))
    return root
