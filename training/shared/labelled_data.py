"""Labelled data for evaluation and fine-tuning: the training and held-out splits, their label
names, and class-balanced label subsets for the semi-supervised protocol.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from barlow_cli import UsageError

from .collate import LabelledCollator
from .data import (
    DEFAULT_DATASET_NAME,
    count_examples,
    file_stamps,
    load_held_out_split,
    load_image_dataset,
    prepare_stream,
    resolve_image_column,
    resolve_label_column,
)

__all__ = [
    "LabelledData",
    "check_label_range",
    "data_identity",
    "class_balanced_subset",
    "fraction_name",
    "load_labelled_data",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- data
@dataclass
class LabelledData:
    """A labelled training split and a held-out split, with their columns and class names."""

    train: Any
    eval: Any
    train_split: str
    eval_split: str
    image_column: str
    label_column: str
    label_names: list[str]
    label2id: dict | None  # for labels that are not class ids (e.g. strings)
    identity: dict  # what the data is, for cache keys
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    _labels: dict = field(default_factory=dict, repr=False)
    _subsets: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def split(self, name: str):
        return self.train if name == "train" else self.eval

    def max_samples(self, name: str) -> int | None:
        return self.max_train_samples if name == "train" else self.max_eval_samples

    def labels(self, name: str) -> list[int]:
        """The class ids of a split ("train" or "eval") in stream order, read once (no images decoded)."""
        if name not in self._labels:
            values = _read_labels(self.split(name), self.label_column, self.max_samples(name))
            self._labels[name] = self._encode(values, name)
        return self._labels[name]

    def num_examples(self, name: str) -> int:
        count = count_examples(self.split(name))
        if count is None:
            return len(self.labels(name))
        cap = self.max_samples(name)
        return min(count, cap) if cap else count

    def _encode(self, values: list, split: str) -> list[int]:
        try:
            ids = [self.label2id[v] for v in values] if self.label2id is not None else [int(v) for v in values]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"The {split} split has a label {error} outside the training labels.") from None
        check_label_range(ids, self.num_classes, split)
        return ids

    def collator(self, transform: Callable, num_channels: int) -> Callable:
        """Undecoded examples -> {"pixel_values", "labels", "num_skipped"} (:class:`LabelledCollator`)."""
        collate = LabelledCollator(transform, self.image_column, self.label_column, num_channels)
        return collate if self.label2id is None else _EncodedLabels(collate, self.label_column, self.label2id)

    def loader(
        self,
        name: str,
        transform: Callable,
        num_channels: int,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 42,
        epoch: int = 0,
        shuffle_buffer_size: int = 10_000,
        num_workers: int = 0,
        indices: Sequence[int] | None = None,
        process_index: int = 0,
        num_processes: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> DataLoader:
        """A loader of one split ("train" or "eval"), optionally only its examples at ``indices``
        (positions in stream order, as in :meth:`labels`), shuffled per ``epoch``, and this
        process's share of it. ``persistent_workers`` keeps its workers between passes."""
        dataset, max_samples = self.split(name), self.max_samples(name)
        if indices is not None:
            dataset, max_samples = self._subset(name, indices), None
        stream = prepare_stream(
            dataset, self.image_column, label_column=self.label_column, seed=seed, shuffle=shuffle,
            shuffle_buffer_size=shuffle_buffer_size, max_samples=max_samples,
            process_index=process_index, num_processes=num_processes,
        )
        stream.set_epoch(epoch)
        return DataLoader(
            stream, batch_size=batch_size, collate_fn=self.collator(transform, num_channels), num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed + epoch),
        )

    def epoch_loaders(
        self, name: str, transform: Callable, num_channels: int, batch_size: int, **loader_options: Any
    ) -> Callable[[int], DataLoader]:
        """``make_loader(epoch)`` for ``fit_classifier``: one shuffled :meth:`loader` whose workers
        live for the whole run, each epoch reshuffled as a fresh ``loader(epoch=epoch)`` would be
        (datasets shares ``set_epoch`` with persistent workers). Restarting the workers every epoch
        costs their start and a first batch each time, which dominates the short epochs of a small
        labelled subset."""
        loader = self.loader(name, transform, num_channels, batch_size, shuffle=True, epoch=0,
                             persistent_workers=True, **loader_options)

        def make_loader(epoch: int) -> DataLoader:
            loader.dataset.set_epoch(epoch)
            return loader

        return make_loader


    def _subset(self, name: str, indices: Sequence[int]) -> datasets.Dataset:
        """The examples at ``indices`` (stream positions) as a map-style set. A stream's subset is
        read once, in order, and kept in memory undecoded: positions counted inside a shuffled
        stream would follow the shuffled shard order, not the order the labels were read in."""
        dataset, keep = self.split(name), sorted(set(int(i) for i in indices))
        if isinstance(dataset, datasets.Dataset):
            return dataset.select(keep)
        key = (name, tuple(keep))
        if key not in self._subsets:
            wanted = set(keep)
            stream = prepare_stream(dataset, self.image_column, label_column=self.label_column, shuffle=False,
                                    max_samples=self.max_samples(name))
            rows = [example for i, example in enumerate(stream) if i in wanted]
            features = datasets.Features({
                self.image_column: datasets.Image(decode=False),
                self.label_column: (stream.features or {}).get(self.label_column) or datasets.Value("string"),
            })
            if not isinstance(features[self.label_column], datasets.ClassLabel) and self.label2id is None:
                features[self.label_column] = datasets.Value("int64")
            self._subsets[key] = datasets.Dataset.from_list(rows, features=features)
        return self._subsets[key]


def check_label_range(labels: Sequence[int] | torch.Tensor, num_classes: int, split: str) -> None:
    """ValueError unless every class id lies in [0, num_classes) (-1 often marks unlabelled examples)."""
    labels = torch.as_tensor(labels)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"The {split} split has labels outside [0, {num_classes}) (e.g. -1 marks unlabelled examples); "
            "evaluate on a labelled split."
        )


class _EncodedLabels:
    """Maps label values to class ids before the collator."""

    def __init__(self, collate: Callable, label_column: str, label2id: dict) -> None:
        self.collate, self.label_column, self.label2id = collate, label_column, label2id

    def __call__(self, examples: list[dict]) -> dict:
        return self.collate([{**ex, self.label_column: self.label2id[ex[self.label_column]]} for ex in examples])


def _read_labels(dataset, label_column: str, max_samples: int | None) -> list:
    if isinstance(dataset, datasets.Dataset):
        rows = dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))
        return list(rows[label_column])
    stream = dataset.select_columns([label_column])
    if max_samples is not None:
        stream = stream.take(max_samples)
    return [example[label_column] for example in stream]


def data_identity(data_args) -> dict:
    """What the data is (source, config, local file stamps), for cache keys and records."""
    source = data_args.train_dir or data_args.dataset_name
    identity: dict[str, Any] = {"config": data_args.dataset_config_name}
    if source is None:
        import sklearn

        identity["source"] = f"{DEFAULT_DATASET_NAME} (scikit-learn {sklearn.__version__})"
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser().resolve()
        files = (Path(root, f) for root, _, names in os.walk(path) for f in names) if path.is_dir() else [path]
        identity.update(source=str(path), files=file_stamps(files, path.parent if path.is_file() else path))
    else:
        identity["source"] = source
    return identity


def load_labelled_data(data_args, supervised_args) -> LabelledData:
    """The training split (``--train_split``) and the held-out one (``--eval_split``, else
    'validation', else 'test'), with the image and label columns and the class names (from a
    ``ClassLabel`` feature; else the sorted distinct labels, read from the training split)."""
    train = load_image_dataset(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_split, data_args.train_dir,
        data_args.streaming, data_args.cache_dir,
    )
    held_out, eval_split = load_held_out_split(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.streaming,
        data_args.cache_dir, split=supervised_args.eval_split,
    )
    image_column = resolve_image_column(train, data_args.image_column)
    label_column = resolve_label_column(train, supervised_args.label_column)
    if label_column is None:
        columns = list(train.features) if train.features is not None else train.column_names
        raise UsageError(f"No label column (no ClassLabel feature, none of label/labels/cls); the dataset has columns "
                         f"{columns}. Pass --label_column.")
    resolve_label_column(held_out, label_column)  # the held-out split must have it too
    data = LabelledData(
        train, held_out, data_args.train_split, eval_split, image_column, label_column, [], None,
        identity={**data_identity(data_args), "image_column": image_column, "label_column": label_column},
        max_train_samples=data_args.max_train_samples, max_eval_samples=supervised_args.max_eval_samples,
    )
    feature = (train.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        data.label_names = list(feature.names)
        return data
    values = _read_labels(train, label_column, data_args.max_train_samples)
    if not values:
        raise ValueError("The training split is empty.")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        data.label_names = [str(i) for i in range(int(max(values)) + 1)]
    else:
        distinct = sorted(set(values), key=str)
        data.label_names = [str(v) for v in distinct]
        data.label2id = {v: i for i, v in enumerate(distinct)}
    data._labels["train"] = data._encode(values, "train")
    return data



# ---------------------------------------------------------------------------------------- subsets
def class_balanced_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """Positions of a class-balanced ``fraction`` of ``labels``: the same number of examples of
    every class, ``max(1, round(fraction * N / C))`` (C = classes present; all of a class that has
    fewer), drawn without replacement with ``seed``. Each class is shuffled once by ``seed``, and
    the subset takes the first examples of that order, so a larger fraction contains a smaller
    one. Returns sorted positions."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("no labels to draw a subset from")
    classes = np.unique(labels)
    per_class = max(1, round(fraction * labels.size / classes.size))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        positions = np.flatnonzero(labels == c)
        chosen.extend(positions[rng.permutation(positions.size)[:per_class]].tolist())
    return sorted(chosen)


def fraction_name(fraction: float) -> str:
    """0.01 -> '1pct', 0.1 -> '10pct', 0.005 -> '0.5pct' (metric names)."""
    return f"{round(fraction * 100, 6):g}pct"
