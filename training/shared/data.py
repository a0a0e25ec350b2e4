"""Image data for Barlow Twins: loading, column resolution and per-process streaming.

Pipeline: :func:`load_image_dataset` -> :func:`prepare_stream` (columns, undecoded images, global
cap, shuffle, per-process shard) -> ``DataLoader(stream, collate_fn=TwoViewCollator(...))`` (the
collators and image decoding are in ``collate.py``).

* Sharding happens here, exactly once (``split_dataset_by_node``): do not also pass the DataLoader
  through ``accelerator.prepare``, which would shard a second time and silently drop data.
* Images reach the collator undecoded (``Image(decode=False)``); the collators decode them,
  and skip and count an unreadable file instead of crashing.
* Default data: scikit-learn's handwritten digits (1797 real images, bundled, works offline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node
from PIL import Image as PILImage

from barlow_cli import UsageError

from .collate import decode_image

__all__ = [
    "DEFAULT_DATASET_NAME", "load_image_dataset", "resolve_image_column", "resolve_label_column",
    "prepare_stream", "count_examples", "column_names", "file_stamps", "is_local_source", "load_held_out_split",
]

logger = logging.getLogger(__name__)

DEFAULT_DATASET_NAME = "sklearn-digits"
_DIGITS_SIZE = 32  # stored side of the digits (bicubic upsampling of the 8x8 originals)
_DIGITS_SEED = 0
_STREAM_SHARDS = 8
_IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
_LABEL_COLUMN_NAMES = ("label", "labels", "cls")  # "cls": the webdataset convention

AnyDataset = datasets.Dataset | datasets.IterableDataset


# ---------------------------------------------------------------------------------------- loading
@lru_cache(maxsize=1)
def _digits_splits() -> dict[str, datasets.Dataset]:
    """The digits: ``{"train": 1438 rows (a fixed seeded 80% draw), "test": the other 359}``.

    The 8x8 images (16 grey levels) are rescaled to 0..255 and upsampled to 32x32 with bicubic
    interpolation, stored as greyscale ("L") PNG. Upsampling adds no information, but on 8x8 a
    random-resized crop can only move by whole original pixels; at 32 px crops and blurs are
    finer, and 32 px is the small-image stem's input size.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(_DIGITS_SEED).permutation(len(digits.target))
    n_train = int(round(0.8 * len(order)))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    out = {}
    for name, idx in (("train", order[:n_train]), ("test", order[n_train:])):
        pixels = np.clip(digits.images[idx] * 255.0 / 16.0, 0, 255).round().astype(np.uint8)
        size = (_DIGITS_SIZE, _DIGITS_SIZE)
        images = [PILImage.fromarray(p).resize(size, PILImage.Resampling.BICUBIC) for p in pixels]
        info = datasets.DatasetInfo(
            description="scikit-learn handwritten digits (UCI), 32x32 greyscale",
            features=features,
            dataset_name=DEFAULT_DATASET_NAME,
            splits=datasets.SplitDict({name: datasets.SplitInfo(name, num_examples=len(idx))}),
        )
        out[name] = datasets.Dataset.from_dict(
            {"image": images, "label": digits.target[idx].tolist()}, info=info, split=datasets.NamedSplit(name)
        )
    return out


def _to_iterable(ds: datasets.Dataset, num_shards: int = _STREAM_SHARDS) -> datasets.IterableDataset:
    """``ds.to_iterable_dataset``, keeping the info and split size it would otherwise drop."""
    it = ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
    it.info.update(ds.info)
    name = str(ds.split or "train")
    it.info.splits = datasets.SplitDict({name: datasets.SplitInfo(name, num_examples=len(ds))})
    return it


def _load_from_disk(path: Path, split: str, streaming: bool) -> AnyDataset:
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"Unknown split {split!r} in {path}; available splits: {sorted(ds)}")
        ds = ds[split]
    elif ds.split is not None and str(ds.split) != split:
        raise ValueError(f"Unknown split {split!r} in {path}; available splits: [{str(ds.split)!r}]")
    return _to_iterable(ds) if streaming else ds


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    train_dir: str | None = None,
    streaming: bool = True,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of an image data set, as an ``IterableDataset`` if ``streaming``.

    Sources: ``train_dir`` (an imagefolder directory); ``dataset_name`` as a local path (a
    ``save_to_disk`` folder, else whatever ``load_dataset(path)`` detects: imagefolder, parquet,
    webdataset ``.tar`` shards) or a hub id (offline: from the local HF cache); neither: the bundled
    digits (:data:`DEFAULT_DATASET_NAME`; "train", "test" = "validation"; streamed as 8 shards).

    Raises:
        ValueError: both sources given; an unknown split (the message lists the splits).
        FileNotFoundError: a missing local path or one without data; a hub id that is unreachable
            (offline and not cached).
    """
    if train_dir is not None and dataset_name is not None:
        raise ValueError("Give either dataset_name or train_dir, not both.")
    if train_dir is None and dataset_name is None:
        splits, name = _digits_splits(), "test" if split == "validation" else split
        if name not in splits:
            raise ValueError(
                f"Unknown split {split!r} for {DEFAULT_DATASET_NAME}; "
                "available splits: ['train', 'test', 'validation']"
            )
        ds = splits[name].with_format(None)  # a copy: in-place set_format/set_transform stay local
        if not streaming:
            return ds
        it = _to_iterable(ds)
        it.info.splits[split] = datasets.SplitInfo(split, num_examples=len(ds))  # "validation" too
        return it

    config, kwargs = dataset_config_name, {}
    if train_dir is not None:
        path, source, config = Path(train_dir).expanduser(), "imagefolder", None
        if not path.is_dir():
            raise FileNotFoundError(f"train_dir {str(path)!r} is not a directory")
        kwargs["data_dir"] = str(path)
    else:
        path, source = Path(dataset_name).expanduser(), dataset_name
        if path.exists():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return _load_from_disk(path, split, streaming)
            source = str(path)
        elif dataset_name.startswith(("/", ".", "~")) or dataset_name.count("/") > 1:
            raise FileNotFoundError(f"Local dataset path {dataset_name!r} does not exist")
    try:
        return datasets.load_dataset(source, config, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except ValueError as err:  # e.g. an unknown split: datasets' message names the available ones
        raise ValueError(f"Could not load {source!r} (config={config!r}, split={split!r}): {err}") from err
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(
            f"Could not load {source!r} (config={config!r}, split={split!r}): {err}. Offline "
            "(HF_HUB_OFFLINE=1), only data sets in the local Hugging Face cache load; or pass a local directory."
        ) from err


HELD_OUT_SPLITS = ("validation", "test")


def load_held_out_split(
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    streaming: bool = True,
    cache_dir: str | None = None,
    split: str | None = None,
) -> tuple[AnyDataset, str]:
    """``(dataset, split name)`` of the held-out split: ``split`` when given, else 'validation',
    else 'test'. Raises UsageError (a ValueError) when there is none (the message says which were
    tried)."""
    names = [split] if split else list(HELD_OUT_SPLITS)
    error: Exception | None = None
    for name in names:
        try:
            return load_image_dataset(dataset_name, dataset_config_name, name, train_dir, streaming, cache_dir), name
        except (ValueError, KeyError) as err:
            error = err
    # An option or input to change (status 2): another --eval_split, or a dataset with that split.
    if split:
        raise UsageError(f"Cannot load the evaluation split {split!r}: {error}")
    raise UsageError(f"The dataset has no 'validation' or 'test' split ({error}); pass --eval_split.")


# ---------------------------------------------------------------------------------------- columns
def _peek(dataset: AnyDataset) -> dict[str, Any]:
    try:
        return next(iter(dataset.take(1))) if isinstance(dataset, datasets.IterableDataset) else dataset[0]
    except (StopIteration, IndexError):
        raise ValueError("The dataset is empty: cannot infer its columns") from None


def column_names(dataset: AnyDataset) -> list[str]:
    """The dataset's columns (from its features, else its first example)."""
    if dataset.features is not None:
        return list(dataset.features)
    return list(dataset.column_names or _peek(dataset))


def _looks_like_image(value: Any) -> bool:
    if isinstance(value, PILImage.Image):
        return True
    if isinstance(value, dict):
        return bool(value) and set(value) <= {"bytes", "path"} and any(v is not None for v in value.values())
    return isinstance(value, (bytes, bytearray)) and decode_image(value) is not None


def _non_image_kind(dataset: AnyDataset, column: str) -> str | None:
    """What a column holds when it cannot hold images (class labels, numbers), else None."""
    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.ClassLabel):
        return "class labels"
    if isinstance(feature, datasets.Value):
        return None if feature.dtype in ("binary", "large_binary", "string", "large_string") else f"{feature.dtype} values"
    if feature is None:
        value = _peek(dataset).get(column)
        if isinstance(value, (bool, int, float, np.number)):
            return f"{type(value).__name__} values"
    return None


def resolve_image_column(dataset: AnyDataset, image_column: str | None = None) -> str:
    """The image column: ``image_column`` if given (checked), else the first ``datasets.Image``
    column (when ``features`` is unknown: the first column whose first value is an image), else a
    common name ("image", "img", "jpg", ...). Raises ValueError naming the columns present."""
    columns = column_names(dataset)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"Image column {image_column!r} not found; the dataset has columns {columns}")
        kind = _non_image_kind(dataset, image_column)
        if kind is not None:
            raise ValueError(
                f"Column {image_column!r} holds {kind}, not images; the dataset has columns {columns}. "
                "Give the column of images (or image bytes or paths) as the image column."
            )
        return image_column
    if dataset.features is not None:
        found = [n for n, f in dataset.features.items() if isinstance(f, datasets.Image)]
    else:
        example = _peek(dataset)
        found = [n for n in columns if _looks_like_image(example.get(n))]
    found += [n for n in _IMAGE_COLUMN_NAMES if n in columns]
    if not found:
        raise ValueError(
            f"No image column (no datasets.Image feature, none of {list(_IMAGE_COLUMN_NAMES)}); "
            f"the dataset has columns {columns}. Pass image_column."
        )
    return found[0]


def resolve_label_column(dataset: AnyDataset, label_column: str | None = None) -> str | None:
    """The label column: ``label_column`` if given (checked; ValueError naming the columns), else the
    first ``ClassLabel`` column, else "label", "labels" or "cls" (webdataset) if present, else None."""
    columns = column_names(dataset)
    if label_column is not None:
        if label_column not in columns:
            raise UsageError(f"Label column {label_column!r} not found; the dataset has columns {columns}")
        return label_column
    found = [n for n, f in (dataset.features or {}).items() if isinstance(f, datasets.ClassLabel)]
    return next(iter(found + [n for n in _LABEL_COLUMN_NAMES if n in columns]), None)


# ----------------------------------------------------------------------------------------- stream
def _num_shards_for(num_rows: int, num_processes: int) -> int:
    """Shards for a map-style set turned iterable: a multiple of ``num_processes`` (so processes
    split by shard), >= 8 and >= 4 per process (DataLoader workers), at most ``num_rows``."""
    num_shards = num_processes * max(4, -(-_STREAM_SHARDS // num_processes))
    if num_shards > num_rows:
        num_shards = (num_rows // num_processes) * num_processes or num_rows
    return max(1, num_shards)


def prepare_stream(
    dataset: AnyDataset,
    image_column: str,
    *,
    label_column: str | None = None,
    seed: int = 42,
    shuffle_buffer_size: int = 10_000,
    process_index: int = 0,
    num_processes: int = 1,
    max_samples: int | None = None,
    shuffle: bool = True,
    keep_columns: Sequence[str] = (),
) -> datasets.IterableDataset:
    """This process's share of ``dataset``: an ``IterableDataset`` of undecoded images.

    Steps: to iterable (map-style: a multiple of ``num_processes`` shards) -> keep the image (and
    label, and ``keep_columns``) column -> ``Image(decode=False)``, so examples carry ``{"bytes", "path"}`` -> take
    ``max_samples`` (a global cap on the count, the same subset every epoch; when processes split
    by shard, datasets spreads the cap over the shards, so which examples are kept depends on the
    number of processes) -> buffer shuffle with ``seed`` -> ``split_dataset_by_node``, once.

    Call ``set_epoch(epoch)`` on the result before every epoch: the order is a function of
    (seed, epoch), the same on every process, so the shares stay disjoint. If the shard count is
    not a multiple of ``num_processes``, each process reads the whole stream and keeps one example
    in ``num_processes`` (a logged warning: slower, still disjoint and complete).
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"Need 0 <= process_index < num_processes, got {process_index} and {num_processes}")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    if num_processes > 1 and getattr(dataset, "_distributed", None) is not None:
        raise ValueError("The dataset is already split by node; prepare_stream shards it (exactly once)")
    if isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset(num_shards=_num_shards_for(len(dataset), num_processes))
    columns = list(dict.fromkeys([image_column, *([label_column] if label_column else []), *keep_columns]))
    present = column_names(dataset)
    if any(c not in present for c in columns):
        raise ValueError(f"Columns {columns} not all found; the dataset has columns {present}")
    dataset = dataset.select_columns(columns)
    if dataset.features is not None and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if max_samples is not None:
        dataset = dataset.take(max_samples)
    if shuffle:
        # One shard feeds the buffer at a time (shard order still shuffled per epoch), as before
        # datasets 5: its default reads up to 10 shards through a thread pool, and for parquet that
        # pool's shutdown sleeps 5 s (apache/arrow#45214) at every epoch end, in every worker.
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size, max_buffer_input_shards=1)
    if num_processes > 1:
        if dataset.n_shards % num_processes:
            logger.warning(
                "The stream has %d shard(s), not a multiple of num_processes=%d: every process reads all of "
                "it and keeps 1 example in %d (split by example). More data files would be faster.",
                dataset.n_shards, num_processes, num_processes,
            )
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    return dataset


def file_stamps(paths: Iterable[Path], root: Path) -> list:
    """(path relative to ``root``, size, mtime_ns) of each file, sorted: changes when any of them
    is rewritten or replaced (cache keys of local data and models)."""
    return sorted([str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.is_file())


def is_local_source(dataset_name: str | None, train_dir: str | None) -> bool:
    """Whether the data comes from this machine (a folder, or the bundled digits) rather than the hub."""
    return dataset_name is None or train_dir is not None or Path(dataset_name).expanduser().exists()


def count_examples(dataset: AnyDataset, split: str | None = None) -> int | None:
    """``len()`` of a map-style set; for an iterable one the size in ``dataset.info.splits``
    (``split``, else the dataset's split, else the only one recorded), or None. Never iterates.
    Apply it to the loaded split: it knows nothing of ``max_samples`` or sharding."""
    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    splits = (dataset.info.splits if dataset.info is not None else None) or {}
    name = split or (str(dataset.split) if dataset.split is not None else None)
    info = splits.get(name) if name is not None else next(iter(splits.values())) if len(splits) == 1 else None
    return int(info.num_examples) if info is not None and info.num_examples else None
