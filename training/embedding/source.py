"""The images behind queries and hits: query files read with a clear error, and an index's rows
found again in their source (a file under the image folder, or the example at ``id`` in the
split, reloaded with the options embedding_info.json records)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from barlow_cli import UsageError

from ..shared.collate import decode_image
from ..shared.data import load_image_dataset

__all__ = ["SourceImages", "read_query_images"]


def read_query_images(images: Sequence[Any], mode: str = "RGB") -> list[PILImage.Image]:
    """Decode each query (a path or a PIL image) to ``mode``. UsageError (a ValueError: a query to
    change) naming a query that is missing or cannot be read as an image."""
    if not images:
        raise ValueError("No query image given.")
    decoded = []
    for image in images:
        if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
            raise UsageError(f"Query {image}: no such file.")
        result = decode_image(image, mode)
        if result is None:
            raise UsageError(f"Query {image}: not a readable image (corrupt, truncated or not an image file).")
        decoded.append(result)
    return decoded


class SourceImages:
    """``images[row]`` -> the PIL image (RGB) of an index row, or None if it cannot be read now."""

    def __init__(self, index) -> None:
        self.index, self._dataset = index, None
        self.source = index.info.get("source", {})

    def _split(self):
        if self._dataset is None:
            source = self.source
            dataset = load_image_dataset(
                source.get("dataset_name"), source.get("dataset_config_name"), source.get("split", "train"),
                source.get("train_dir"), streaming=False,
            )
            self._dataset = dataset.select_columns([source["image_column"]])
        return self._dataset

    def __getitem__(self, row: int) -> PILImage.Image | None:
        value = self.index.columns[self.index.key][row]
        if self.index.key == "path":
            return decode_image(str(Path(self.source["root"]) / value))
        return decode_image(self._split()[int(value)][self.source["image_column"]])
