"""Datasets for dense tasks in HF's formats, their columns and class names, and the collators.

* semantic-segmentation: an image column and a mask column, an image of one class id per pixel
  (HF's semantic-segmentation guide: `image` and `annotation`, or `pixel_values` and `label`).
* object-detection: an image column and `objects`, holding per image `bbox` (boxes in pixels,
  COCO's [x_min, y_min, width, height] by default) and `category` (class ids), as in HF's
  object-detection guide; a list of per-object dicts works too.

Loading, column resolution, streaming and sharding are `training.shared.data`'s; decoding and skipping
unreadable images are `training.shared.collate`'s (an unreadable image or mask skips its example and is
counted). Image and annotation are transformed together with torchvision's v2 transforms, so a
crop or flip moves boxes and masks with the pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from barlow_cli import UsageError

from ...shared.collate import ImageCollator, decode_image
from ...shared.data import count_examples, load_held_out_split, load_image_dataset, prepare_stream, resolve_image_column

__all__ = ["DenseData", "load_dense_data", "resolve_mask_column", "resolve_objects_column"]

logger = logging.getLogger(__name__)

MASK_COLUMN_NAMES = ("annotation", "label", "labels", "mask", "masks", "segmentation", "semantic_mask", "seg", "gt")


# ------------------------------------------------------------------------------------- columns
def _columns(dataset) -> list[str]:
    return list(dataset.features) if dataset.features is not None else list(dataset.column_names or [])


def resolve_mask_column(dataset, image_column: str, mask_column: str | None = None) -> str:
    """The column of segmentation masks: `mask_column` if given, else the `Image` column other than
    `image_column`, else a usual name. ValueError naming the expected and the present columns."""
    columns = _columns(dataset)
    if mask_column is not None:
        if mask_column not in columns:
            raise ValueError(f"Mask column {mask_column!r} not found; the dataset has columns {columns}.")
        return mask_column
    images = [n for n, f in (dataset.features or {}).items() if isinstance(f, datasets.Image) and n != image_column]
    named = [n for n in MASK_COLUMN_NAMES if n in columns and n != image_column]
    found = images + named
    if not found:
        raise UsageError(
            f"The dataset has no segmentation masks: semantic-segmentation needs, besides the image column "
            f"{image_column!r}, a mask column (an image of one class id per pixel, such as 'annotation' or 'label' in "
            f"HF's semantic-segmentation guide). It has columns {columns}; pass --mask_column."
        )
    return found[0]


def _object_fields(feature) -> set[str] | None:
    """The sub-fields of an `objects` feature (a dict of lists, or a list of dicts)."""
    inner = getattr(feature, "feature", feature)  # datasets' List / Sequence wrap their element
    return set(inner) if isinstance(inner, dict) else None


def resolve_objects_column(dataset, objects_column: str | None = None) -> str:
    """The column of per-image objects with `bbox` and `category`: `objects_column` if given, else
    `objects`. ValueError naming the expected and the present columns (or sub-fields)."""
    columns = _columns(dataset)
    name = objects_column or "objects"
    if name not in columns:
        raise UsageError(
            f"The dataset has no boxes: object-detection needs an {name!r} column holding, per image, 'bbox' (one box "
            f"per object) and 'category' (its class id), as in HF's object-detection guide. It has columns {columns}"
            + ("; pass --objects_column." if objects_column is None else ".")
        )
    fields = _object_fields((dataset.features or {}).get(name))
    if fields is not None and not {"bbox", "category"} <= fields:
        raise ValueError(
            f"Column {name!r} holds {sorted(fields)}; object-detection needs 'bbox' and 'category' in it (HF's "
            "object-detection guide)."
        )
    return name


def object_lists(value: Any) -> tuple[list, list]:
    """(boxes, categories) of one image's `objects`, a dict of lists or a list of dicts."""
    if isinstance(value, dict):
        return list(value.get("bbox") or []), list(value.get("category") or [])
    if isinstance(value, list):
        return [o["bbox"] for o in value], [o["category"] for o in value]
    raise ValueError(f"An 'objects' value must be a dict of 'bbox' and 'category' lists, got {type(value).__name__}.")


def _class_label_names(dataset, column: str, task: str) -> list[str] | None:
    feature = (dataset.features or {}).get(column)
    if task == "object-detection":
        inner = getattr(feature, "feature", feature)
        feature = inner.get("category") if isinstance(inner, dict) else None
        feature = getattr(feature, "feature", feature)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _mask_array(value: Any) -> np.ndarray | None:
    """One mask as (H, W) class ids, or None if unreadable. ValueError for a colour (RGB) mask."""
    image = decode_image(value, mode=None)
    if image is None:
        return None
    if image.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ValueError(
            f"Segmentation masks must hold one class id per pixel (a greyscale, palette or 16-bit image); got a "
            f"{image.mode} image. Convert colour-coded masks to class ids first."
        )
    array = np.asarray(image)
    return array if array.ndim == 2 else array[..., 0]


# --------------------------------------------------------------------------------------- data
@dataclass
class DenseData:
    """The training and held-out splits of a dense task, their columns and class names."""

    task: str
    train: Any
    eval: Any
    eval_split: str
    image_column: str
    annotation_column: str
    label_names: list[str]
    bbox_format: str = "coco"
    ignore_index: int = 255
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    _counts: dict = field(default_factory=dict, repr=False)

    @property
    def id2label(self) -> dict[int, str]:
        return {i: name for i, name in enumerate(self.label_names)}

    def num_examples(self, name: str) -> int:
        split, cap = (self.train, self.max_train_samples) if name == "train" else (self.eval, self.max_eval_samples)
        count = count_examples(split)
        if count is None:
            count = sum(1 for _ in split.select_columns([self.annotation_column]))
        return min(count, cap) if cap else count

    def loader(
        self, name: str, collate: Callable, batch_size: int, *, shuffle: bool = False, seed: int = 42,
        shuffle_buffer_size: int = 10_000, num_workers: int = 0, process_index: int = 0, num_processes: int = 1,
        pin_memory: bool = False,
    ) -> DataLoader:
        """A loader of this process's share of a split ("train" or "eval"); `set_epoch` on its
        dataset reshuffles it. Its workers live for the whole run."""
        split, cap = (self.train, self.max_train_samples) if name == "train" else (self.eval, self.max_eval_samples)
        stream = prepare_stream(
            split, self.image_column, label_column=self.annotation_column, seed=seed, shuffle=shuffle,
            shuffle_buffer_size=shuffle_buffer_size, max_samples=cap, process_index=process_index,
            num_processes=num_processes,
        )
        stream.set_epoch(0)
        return DataLoader(
            stream, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=pin_memory,
        )


def _undecoded(dataset, column: str):
    # Masks reach the collator as bytes, so a corrupt one is skipped there, not raised by datasets.
    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def load_dense_data(data_args, task_args) -> DenseData:
    """The training split and the held-out one (--eval_split, else 'validation', else 'test'), with
    the image and annotation columns and the class names (a ClassLabel feature, --label_names, or
    '0'..'K-1' from the largest class id in the training annotations)."""
    if data_args.dataset_name is None and data_args.train_dir is None:
        raise UsageError(
            f"--task {task_args.task} needs --dataset_name (a hub id or a local folder) with "
            + ("images and masks." if task_args.task == "semantic-segmentation" else "images and their 'objects'.")
        )
    train = load_image_dataset(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_split, data_args.train_dir,
        data_args.streaming, data_args.cache_dir,
    )
    held_out, eval_split = load_held_out_split(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.streaming,
        data_args.cache_dir, split=task_args.eval_split,
    )
    image_column = resolve_image_column(train, data_args.image_column)
    if task_args.task == "semantic-segmentation":
        column = resolve_mask_column(train, image_column, task_args.mask_column)
        resolve_mask_column(held_out, image_column, column)
        train, held_out = _undecoded(train, column), _undecoded(held_out, column)
    else:
        column = resolve_objects_column(train, task_args.objects_column)
        resolve_objects_column(held_out, column)
    data = DenseData(
        task_args.task, train, held_out, eval_split, image_column, column, [], task_args.bbox_format,
        task_args.ignore_index, data_args.max_train_samples, task_args.max_eval_samples,
    )
    data.label_names = (
        list(task_args.label_names) if task_args.label_names
        else _class_label_names(train, column, task_args.task) or _names_from_ids(data)
    )
    if task_args.task == "semantic-segmentation":
        _check_first_mask(data)
    return data


def _annotations(data: DenseData):
    stream = data.train.select_columns([data.annotation_column])
    if data.max_train_samples is not None:
        stream = stream.take(data.max_train_samples) if isinstance(stream, datasets.IterableDataset) \
            else stream.select(range(min(data.max_train_samples, len(stream))))
    return (example[data.annotation_column] for example in stream)


def _names_from_ids(data: DenseData) -> list[str]:
    largest = -1
    if data.task == "object-detection":
        for value in _annotations(data):
            categories = object_lists(value)[1]
            if any(not isinstance(c, (int, np.integer)) for c in categories):
                raise ValueError("'category' values must be class ids (integers) or a ClassLabel feature.")
            largest = max([largest, *map(int, categories)])
    else:
        logger.info("Reading every training mask for the class count (pass --label_names to skip this).")
        for value in _annotations(data):
            mask = _mask_array(value)
            if mask is not None:
                ids = np.unique(mask)
                ids = ids[ids != data.ignore_index]
                if ids.size:
                    largest = max(largest, int(ids.max()))
    if largest < 0:
        raise ValueError("The training annotations hold no class ids (no objects, or masks of ignored pixels only).")
    return [str(i) for i in range(largest + 1)]


def _check_first_mask(data: DenseData) -> None:
    for value in _annotations(data):
        if _mask_array(value) is not None:  # raises for a colour mask
            return


# -------------------------------------------------------------------------------- transforms
def segmentation_transform(size: int, mean, std, train: bool, min_crop_scale: float = 0.5):
    """(image, mask) -> (normalised (C, size, size) float image, (size, size) long mask); training
    adds a random resized crop and a flip, applied to both (masks by nearest neighbour)."""
    geometry = [v2.RandomResizedCrop((size, size), scale=(min_crop_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()] \
        if train else [v2.Resize((size, size), antialias=True)]
    return v2.Compose([*geometry, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                       v2.Normalize(mean, std)])


def detection_transform(size: int, mean, std, train: bool, min_crop_scale: float = 0.5):
    """{"image", "boxes", "labels"} -> the same at size x size, normalised; training adds a random
    resized crop and a flip, then drops boxes cropped away (torchvision's SanitizeBoundingBoxes)."""
    geometry = [v2.RandomResizedCrop((size, size), scale=(min_crop_scale, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)] \
        if train else [v2.Resize((size, size), antialias=True)]
    return v2.Compose([*geometry, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                       v2.Normalize(mean, std)])


# --------------------------------------------------------------------------------- collators
def _image_tensor(image: PILImage.Image) -> tv_tensors.Image:
    array = np.asarray(image)
    array = array[:, :, None] if array.ndim == 2 else array
    return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


class SegmentationCollator(ImageCollator):
    """Undecoded examples -> {"pixel_values": (B, C, S, S), "labels": (B, S, S) long, "num_skipped"}."""

    def __init__(self, transform, image_column: str, mask_column: str, num_channels: int = 3) -> None:
        super().__init__(transform, image_column, num_channels)
        self.mask_column = mask_column

    def __call__(self, examples: list[dict]) -> dict:
        images, kept, skipped = self._decode_all(examples)
        pixels, masks = [], []
        for image, example in zip(images, kept):
            mask = _mask_array(example[self.mask_column])
            if mask is None or mask.shape != (image.height, image.width):
                skipped += 1  # unreadable, or not the image's size: not this image's mask
                continue
            x, y = self.transform(_image_tensor(image), tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64))))
            pixels.append(x)
            masks.append(y.as_subclass(torch.Tensor))
        return {"pixel_values": self._stack("pixel_values", pixels), "labels": self._stack("labels", masks),
                "num_skipped": skipped}


class DetectionCollator(ImageCollator):
    """Undecoded examples -> {"pixel_values": (B, C, S, S), "labels": DETR's targets (per image
    "class_labels" (N,) and "boxes" (N, 4) as normalised centre x, centre y, width, height),
    "boxes_xyxy": per image (N, 4) boxes in pixels of the S x S input, "num_skipped"}."""

    def __init__(self, transform, image_column: str, objects_column: str, num_labels: int, bbox_format: str = "coco",
                 num_channels: int = 3) -> None:
        super().__init__(transform, image_column, num_channels)
        self.objects_column, self.num_labels = objects_column, num_labels
        self.box_format = tv_tensors.BoundingBoxFormat.XYWH if bbox_format == "coco" else tv_tensors.BoundingBoxFormat.XYXY

    def __call__(self, examples: list[dict]) -> dict:
        images, kept, skipped = self._decode_all(examples)
        pixels, targets, boxes_xyxy = [], [], []
        for image, example in zip(images, kept):
            boxes, categories = object_lists(example[self.objects_column])
            labels = torch.tensor([int(c) for c in categories], dtype=torch.long)
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
                raise ValueError(f"An object's category {labels.tolist()} lies outside the {self.num_labels} classes.")
            sample = {
                "image": _image_tensor(image),
                "boxes": tv_tensors.BoundingBoxes(
                    torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format=self.box_format,
                    canvas_size=(image.height, image.width),
                ),
                "labels": labels,
            }
            out = self.transform(sample)
            size = out["image"].shape[-1]
            xyxy = v2.functional.convert_bounding_box_format(out["boxes"], new_format=tv_tensors.BoundingBoxFormat.XYXY)
            xyxy = xyxy.as_subclass(torch.Tensor)
            centre = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                                  xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=1) / size
            pixels.append(out["image"].as_subclass(torch.Tensor))
            targets.append({"class_labels": out["labels"], "boxes": centre})
            boxes_xyxy.append(xyxy)
        return {"pixel_values": self._stack("pixel_values", pixels), "labels": targets, "boxes_xyxy": boxes_xyxy,
                "num_skipped": skipped}
