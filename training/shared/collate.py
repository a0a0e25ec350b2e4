"""Decoding images and collating them into batches, in the DataLoader workers.

:func:`decode_image` reads any image value a dataset may hold (PIL image, bytes, path, array) and
returns ``None`` for an unreadable one; the collators skip and count those instead of crashing,
so one corrupt file never stops a run.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

__all__ = ["decode_image", "ImageCollator", "TwoViewCollator", "LabelledCollator", "whole_batches"]

logger = logging.getLogger(__name__)

_MODES = {1: "L", 3: "RGB"}


# --------------------------------------------------------------------------------------- decoding
def _open(value: Any) -> PILImage.Image:
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, np.ndarray):
        array = value
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.dtype.kind == "f" and array.size and np.nanmax(array) <= 1.0:
            array = array * 255.0
        array = np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)
        return PILImage.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return PILImage.open(io.BytesIO(bytes(value)))
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    if value.get("bytes") is not None:
        return PILImage.open(io.BytesIO(value["bytes"]))
    path = value.get("path")
    if path is None:
        raise ValueError("neither bytes nor path")
    if os.path.isfile(path):
        return PILImage.open(path)
    return datasets.Image().decode_example({"bytes": None, "path": path})  # remote: hf://, https://, ...


def _to_mode(image: PILImage.Image, mode: str) -> PILImage.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / float -> 8-bit grey
        array = np.asarray(image, dtype=np.float64)
        peak = array.max(initial=0.0)
        scale = 1.0 / 257.0 if peak > 255 else 255.0 if image.mode == "F" and peak <= 1.0 else 1.0
        image = PILImage.fromarray(np.clip(array * scale, 0, 255).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # composite on white
        white = PILImage.new("RGBA", image.size, (255, 255, 255, 255))
        image = PILImage.alpha_composite(white, image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)


_IMAGE_VALUE_TYPES = (PILImage.Image, np.ndarray, bytes, bytearray, memoryview, str, os.PathLike, dict)


def decode_image(value: Any, mode: str | None = "RGB") -> PILImage.Image | None:
    """Read one image value and convert it to ``mode`` ("RGB": 3 channels, "L": 1 channel; None:
    as stored, for segmentation masks, whose palette indices or 16-bit values are class ids).

    ``value``: a PIL image, ``{"bytes": ..., "path": ...}``, raw bytes, a path, or a numpy array
    (H, W), (H, W, C) or (C, H, W) (floats with max <= 1 are scaled by 255). Transparent images
    (RGBA, LA, P with transparency) are composited on white; 16-bit and float images are scaled
    to 8 bits. Returns None for None or an unreadable image (corrupt or truncated file, non-image
    bytes, missing file); raises TypeError for a value of another type (a wrong column).
    """
    if value is None:
        return None
    if not isinstance(value, _IMAGE_VALUE_TYPES):
        raise TypeError(f"Cannot read an image from a {type(value).__name__}")
    try:
        image = _open(value)
        image.load()  # PIL decodes lazily: surface truncation errors here
        return image if mode is None else _to_mode(image, mode)
    except Exception as err:  # noqa: BLE001 - any unreadable image is skipped by the caller
        logger.debug("Unreadable image (%s: %s)", type(err).__name__, err)
        return None


# -------------------------------------------------------------------------------------- collators
class ImageCollator:
    """Base of the collators: decodes a batch's images (skipping and counting unreadable ones) and
    stacks tensors, keeping the shape of the last batch for an all-unreadable one."""

    def __init__(self, transform, image_column: str, num_channels: int = 3) -> None:
        if num_channels not in _MODES:
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        self.transform, self.image_column, self.num_channels = transform, image_column, num_channels
        self.mode = _MODES[num_channels]
        self._empty: dict[str, torch.Tensor] = {}  # zero-row tensors shaped like the last batch
        self._warnings = 0

    def _decode_all(self, examples: list[dict]) -> tuple[list[PILImage.Image], list[dict], int]:
        images, kept = [], []
        for example in examples:
            image = decode_image(example[self.image_column], self.mode)
            if image is not None:
                images.append(image)
                kept.append(example)
            elif self._warnings < 10:
                self._warnings += 1
                value = example[self.image_column]
                where = value.get("path") if isinstance(value, dict) else None
                logger.warning("Skipping an unreadable image%s", f": {where}" if where else "")
        return images, kept, len(examples) - len(images)

    def _stack(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return self._empty.get(key, torch.empty(0))
        out = torch.stack(tensors)
        self._empty[key] = out.new_empty((0, *out.shape[1:]))
        return out


class TwoViewCollator(ImageCollator):
    """Collate undecoded examples into two augmented views (Barlow Twins pre-training).

    ``transform(PIL image) -> (view1, view2)``, each (C, H, W). Returns ``{"pixel_values": (B, C,
    H, W), "pixel_values_2": (B, C, H, W), "num_skipped": int}``, B = readable images only. If no
    image of a batch is readable, B = 0: shape (0, C, H, W) when this collator (in this worker
    process) has produced a batch before, else (0,). Callers check ``len(batch["pixel_values"])``.
    """

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor | int]:
        images, _, skipped = self._decode_all(examples)
        views = [self.transform(image) for image in images]
        return {
            "pixel_values": self._stack("pixel_values", [v[0] for v in views]),
            "pixel_values_2": self._stack("pixel_values_2", [v[1] for v in views]),
            "num_skipped": skipped,
        }


class LabelledCollator(ImageCollator):
    """Collate examples into one view and labels (evaluation, kNN, linear probe).

    ``transform(PIL image) -> (C, H, W)``. Returns ``{"pixel_values": (B, C, H, W), "labels": (B,)
    long, "num_skipped": int}``; an all-unreadable batch as in :class:`TwoViewCollator`.
    """

    def __init__(self, transform, image_column: str, label_column: str, num_channels: int = 3) -> None:
        super().__init__(transform, image_column, num_channels)
        self.label_column = label_column

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor | int]:
        images, kept, skipped = self._decode_all(examples)
        return {
            "pixel_values": self._stack("pixel_values", [self.transform(image) for image in images]),
            "labels": torch.tensor([int(ex[self.label_column]) for ex in kept], dtype=torch.long),
            "num_skipped": skipped,
        }


# ------------------------------------------------------------------------------------- batching
def _num_examples(batch: dict) -> int:
    return len(batch["pixel_values"]) + int(batch["num_skipped"])


def _merge(batches: list[dict]) -> dict:
    merged = {}
    for key, value in batches[0].items():
        if isinstance(value, torch.Tensor):
            parts = [b[key] for b in batches if len(b[key])] or [value]  # an all-unreadable batch may be (0,)
            merged[key] = torch.cat(parts)
        else:
            merged[key] = sum(int(b[key]) for b in batches)
    return merged


def _split(batch: dict, size: int) -> tuple[dict, dict]:
    """(the first ``size`` examples, the rest): the skipped ones count towards the first."""
    skipped = min(int(batch["num_skipped"]), size)
    rows = size - skipped
    head = {k: v[:rows] if isinstance(v, torch.Tensor) else skipped for k, v in batch.items()}
    rest = {k: v[rows:] if isinstance(v, torch.Tensor) else int(v) - skipped for k, v in batch.items()}
    return head, rest


def whole_batches(batches: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Batches of ``batch_size`` examples (readable or skipped) from a loader that keeps short ones.

    Over an iterable dataset, each DataLoader worker batches its own part of the stream and ends
    the epoch with a short batch. ``drop_last`` would drop up to ``batch_size - 1`` examples per
    worker and epoch (4% of Fashion-MNIST with 8 workers and batches of 512), and an epoch would
    be fewer steps than the dataset's size gives. Short batches are merged here, in arrival order,
    into whole ones; only the epoch's last, fewer than ``batch_size`` examples in all, are left out.
    """
    pending: list[dict] = []
    waiting = 0
    for batch in batches:
        size = _num_examples(batch)
        if size >= batch_size:
            yield batch
            continue
        pending.append(batch)
        waiting += size
        while waiting >= batch_size:
            head, rest = _split(_merge(pending), batch_size)
            yield head
            pending, waiting = [rest], waiting - batch_size
