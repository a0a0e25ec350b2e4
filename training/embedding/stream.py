"""Which images an embedding run reads, and the key each one is stored under.

Every example gets the key a user looks it up by: ``path`` (relative to the source folder) for
images that are files in a local folder (an imagefolder), else ``id``, the example's index in the
split. The index is exact with streaming, DataLoader workers and several processes: the stream is
rebuilt as one generator shard per source shard, each knowing the index its first example has
(map-style sources: arithmetic; streamed ones with several files: their sizes, counted once
without decoding, each process counting its own share). Processes and loader workers then split
that stream through :func:`training.shared.data.prepare_stream`, as training does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from barlow_cli import UsageError

from ..shared.data import column_names, count_examples, load_image_dataset, prepare_stream, resolve_image_column, resolve_label_column

__all__ = ["EmbeddingSource", "INDEX_COLUMN", "PATH_COLUMN", "keyed_stream", "open_source"]

logger = logging.getLogger(__name__)

INDEX_COLUMN = "__index__"  # the example's index in the split
PATH_COLUMN = "__path__"  # its file, relative to the source folder (file-based sources)
_READ_BATCH = 256


@dataclass
class EmbeddingSource:
    """One split of a dataset, its columns, and how its examples are keyed ("id" or "path")."""

    dataset: Any  # datasets.Dataset or IterableDataset, undecoded images
    image_column: str
    label_column: str | None
    keep_columns: list[str]
    key: str  # "id" or "path"
    root: str | None  # the folder that paths are relative to
    num_examples: int | None

    @property
    def columns(self) -> list[str]:
        """The stored columns besides the embedding: the key, the label and the kept ones."""
        return [self.key, *([self.label_column] if self.label_column else []), *self.keep_columns]

    def feature(self, column: str) -> Any:
        """The datasets feature of a stored column, or None when the source does not say."""
        if column == "id":
            return datasets.Value("int64")
        if column == "path":
            return datasets.Value("string")
        return (self.dataset.features or {}).get(column)


def _local_root(data_args) -> Path | None:
    source = data_args.train_dir or data_args.dataset_name
    if source is None:
        return None
    path = Path(source).expanduser()
    return path.resolve() if path.is_dir() else None


def _first_image_path(dataset, image_column: str) -> str | None:
    sample = dataset.select_columns([image_column])
    if isinstance(sample, datasets.IterableDataset):
        sample = sample.take(1)
    else:
        sample = sample.select(range(min(1, len(sample))))
    sample = sample.cast_column(image_column, datasets.Image(decode=False)) if isinstance(
        (sample.features or {}).get(image_column), datasets.Image) else sample
    for example in sample:
        value = example[image_column]
        return value.get("path") if isinstance(value, dict) and value.get("bytes") is None else None
    return None


def open_source(data_args, keep_columns: Sequence[str] = ()) -> EmbeddingSource:
    """Load ``--train_split`` of the source the data options name (the trainer's
    :func:`load_image_dataset`) and resolve its image and label columns and its key.

    Raises ValueError for a missing kept column, one named like a stored column, or an empty split."""
    dataset = load_image_dataset(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_split, data_args.train_dir,
        data_args.streaming, data_args.cache_dir,
    )
    image_column = resolve_image_column(dataset, data_args.image_column)
    label_column = resolve_label_column(dataset)
    present = column_names(dataset)
    keep = [c for c in dict.fromkeys(keep_columns) if c != label_column]
    missing = [c for c in keep if c not in present]
    if missing:
        raise UsageError(f"--keep_columns {' '.join(missing)}: not in the dataset, whose columns are {present}.")
    if image_column in keep:
        raise UsageError(f"--keep_columns {image_column}: the images are not stored beside their embeddings; "
                         "the index keeps their id or path instead.")
    root = _local_root(data_args)
    path = _first_image_path(dataset, image_column) if root is not None else None
    key = "path" if path is not None and os.path.isfile(path) and Path(path).resolve().is_relative_to(root) else "id"
    clash = [c for c in keep if c in ("embedding", key)]
    if clash:
        raise UsageError(f"--keep_columns {clash[0]}: the output has its own {clash[0]!r} column; rename the source's.")
    count = count_examples(dataset, data_args.train_split)
    if data_args.max_train_samples is not None and count is not None:
        count = min(count, data_args.max_train_samples)
    return EmbeddingSource(dataset, image_column, label_column, keep, key, str(root) if root else None, count)


# ------------------------------------------------------------------------------------- the stream
def _shard_sizes_by_counting(dataset: datasets.IterableDataset, column: str) -> list[int]:
    """Rows in each source shard, read without decoding; processes of a launch count their own
    share of the shards and exchange the counts."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    n = dataset.num_shards
    light = dataset.select_columns([column])
    if isinstance(light.features.get(column) if light.features else None, datasets.Image):
        light = light.cast_column(column, datasets.Image(decode=False))
    mine = {j: sum(len(batch[column]) for batch in light.shard(n, j).iter(_READ_BATCH)) for j in range(rank, n, world)}
    if world > 1:
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, mine)
        mine = {j: size for part in gathered for j, size in part.items()}
    return [mine[j] for j in range(n)]


def _source_shards(dataset, num_processes: int, count_column: str) -> list[tuple[int, int, int]]:
    """(shard number, index of its first example, its size or -1 if unknown) for each source shard."""
    if isinstance(dataset, datasets.Dataset):
        rows = len(dataset)
        n = max(1, min(rows, num_processes * 4))
        bounds = [j * rows // n for j in range(n + 1)]
        return [(j, bounds[j], bounds[j + 1] - bounds[j]) for j in range(n)]
    if dataset.num_shards == 1:
        return [(0, 0, -1)]
    logger.info(f"Counting the rows of the {dataset.num_shards} data files, to give every example its index in the split.")
    sizes = _shard_sizes_by_counting(dataset, count_column)
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    return [(j, starts[j], sizes[j]) for j in range(len(sizes))]


def _keyed_examples(
    shards: list[tuple[int, int, int]],
    dataset: Any,
    num_shards: int,
    image_column: str,
    max_samples: int | None,
    done: Collection,
    root: str | None,
) -> Iterator[dict]:
    """The examples of ``shards`` with their index (and path), minus those in ``done`` (a resume).

    ``.iter()`` reads each shard whole: iterating an IterableDataset inside a DataLoader worker
    would otherwise split it again across the workers, and lose rows."""
    for number, start, size in shards:
        if max_samples is not None and start >= max_samples:
            continue
        part = dataset.select(range(start, start + size)) if isinstance(dataset, datasets.Dataset) else \
            dataset.shard(num_shards, number)
        for index, example in enumerate(_rows(part), start=start):
            if max_samples is not None and index >= max_samples:
                break
            example[INDEX_COLUMN] = index
            if root is not None:
                value = example[image_column]
                path = value.get("path") if isinstance(value, dict) else None
                example[PATH_COLUMN] = os.path.relpath(path, root) if path else None
            if example[PATH_COLUMN if root is not None else INDEX_COLUMN] in done:
                continue
            yield example


def _rows(part) -> Iterator[dict]:
    for batch in part.iter(_READ_BATCH):
        names = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(names, values))


def keyed_stream(
    source: EmbeddingSource,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    max_samples: int | None = None,
    done: Collection = frozenset(),
) -> datasets.IterableDataset:
    """This process's share of the source: undecoded images with the label, the kept columns,
    ``__index__`` and, for file-based sources, ``__path__``; examples whose key is in ``done``
    are left out. The first ``max_samples`` examples of the split (in its order) at most."""
    dataset = source.dataset
    columns = list(dict.fromkeys([source.image_column, *([source.label_column] if source.label_column else []),
                                  *source.keep_columns]))
    dataset = dataset.select_columns(columns)
    if isinstance((dataset.features or {}).get(source.image_column), datasets.Image):
        dataset = dataset.cast_column(source.image_column, datasets.Image(decode=False))
    shards = _source_shards(dataset, num_processes, source.label_column or source.image_column)
    features = None
    if dataset.features is not None:
        features = datasets.Features({**dataset.features, INDEX_COLUMN: datasets.Value("int64")})
        if source.key == "path":
            features[PATH_COLUMN] = datasets.Value("string")
    keyed = datasets.IterableDataset.from_generator(
        _keyed_examples,
        features=features,
        gen_kwargs={
            "shards": shards,  # a list: datasets splits it across processes and loader workers
            "dataset": dataset,
            "num_shards": len(shards),
            "image_column": source.image_column,
            "max_samples": max_samples,
            "done": done,
            "root": source.root if source.key == "path" else None,
        },
    )
    extra = [*source.keep_columns, INDEX_COLUMN, *([PATH_COLUMN] if source.key == "path" else [])]
    return prepare_stream(
        keyed, source.image_column, label_column=source.label_column, keep_columns=extra, shuffle=False,
        process_index=process_index, num_processes=num_processes,
    )
