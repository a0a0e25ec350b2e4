"""The embedding folder: parquet shards that ``datasets.load_dataset(folder)`` loads, and
``embedding_info.json``.

Layout::

    folder/data/train-r000-00000.parquet   # rank 0's first shard: embedding, id or path, label, kept columns
    folder/data/train-r001-00000.parquet   # rank 1's (launched on several processes)
    folder/embedding_info.json             # model, dimension, pooling, count, skipped, dtype, ...
    folder/.barlow_embed_run.json          # the settings of the run, so the same command resumes

A shard is written to a hidden temporary file and renamed into place, so every ``train-*.parquet``
is complete. Unreadable images are listed (by key) in the metadata of the shard written after
them, so a resumed run neither retries nor counts them twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DATA_DIR", "INFO_FILE", "RUN_FILE", "ShardWriter", "read_embeddings", "read_info", "shard_files",
    "summarize", "written_keys", "write_json_atomically",
]

DATA_DIR = "data"
INFO_FILE = "embedding_info.json"
RUN_FILE = ".barlow_embed_run.json"
RUN_FILES = (DATA_DIR, INFO_FILE, RUN_FILE)  # what a run writes: the output folder policy's patterns
_SKIPPED_KEY = b"barlow_skipped"


def shard_files(folder: str | os.PathLike, rank: int | None = None) -> list[Path]:
    """The complete shards in ``folder`` (of one rank, if given), in name order."""
    pattern = "train-r*-*.parquet" if rank is None else f"train-r{rank:03d}-*.parquet"
    return sorted((Path(folder) / DATA_DIR).glob(pattern))


def write_json_atomically(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def _skipped_of(metadata: dict | None) -> list:
    raw = (metadata or {}).get(_SKIPPED_KEY)
    return json.loads(raw) if raw else []


def written_keys(folder: str | os.PathLike, key: str) -> set:
    """The keys (ids or paths) already in complete shards, embedded or skipped: a resumed run
    leaves them out."""
    done: set = set()
    for path in shard_files(folder):
        table = pq.read_table(path, columns=[key])
        done.update(table.column(key).to_pylist())
        done.update(_skipped_of(table.schema.metadata))
    return done


def summarize(folder: str | os.PathLike) -> dict:
    """count (embedded rows), skipped (unreadable images) and shards, from the files' metadata."""
    count = skipped = 0
    files = shard_files(folder)
    for path in files:
        meta = pq.read_metadata(path)
        count += meta.num_rows
        skipped += len(_skipped_of(meta.schema.to_arrow_schema().metadata))
    return {"count": count, "skipped": skipped, "shards": len(files)}


class ShardWriter:
    """Buffers one rank's embeddings and writes a shard every ``rows_per_shard`` rows.

    ``add(embeddings (B, D), columns {name: B values}, skipped keys)``; ``close()`` writes the
    rest. Memory holds at most one shard. ``features`` gives each stored column's datasets
    feature where the source knows it (ClassLabel names survive into ``load_dataset``); the others
    are inferred from the first shard's values.
    """

    def __init__(self, folder: str | os.PathLike, rank: int, dimension: int, dtype: str,
                 columns: Sequence[str], features: dict[str, Any], rows_per_shard: int) -> None:
        self.folder = Path(folder) / DATA_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.dimension, self.dtype = rank, dimension, np.dtype(dtype)
        self.columns, self.known_features, self.rows_per_shard = list(columns), dict(features), rows_per_shard
        existing = shard_files(self.folder.parent, rank)
        self.next_number = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        self.features: datasets.Features | None = None
        self._reset()
        self.written_rows = 0

    def _reset(self) -> None:
        self._embeddings: list[np.ndarray] = []
        self._values: dict[str, list] = {c: [] for c in self.columns}
        self._skipped: list = []
        self._rows = 0

    def add(self, embeddings: np.ndarray, columns: dict[str, list], skipped: Sequence = ()) -> None:
        if len(embeddings):
            self._embeddings.append(np.asarray(embeddings, dtype=self.dtype))
            for name in self.columns:
                self._values[name].extend(columns[name])
            self._rows += len(embeddings)
        self._skipped.extend(skipped)
        if self._rows >= self.rows_per_shard:
            self.flush()

    def close(self) -> None:
        if self._rows or self._skipped:
            self.flush()

    def _features(self) -> datasets.Features:
        if self.features is None:
            features = {"embedding": datasets.List(datasets.Value(self.dtype.name), length=self.dimension)}
            for name in self.columns:
                feature = self.known_features.get(name)
                if feature is None:
                    inferred = pa.array(self._values[name]).type
                    feature = datasets.Features.from_arrow_schema(pa.schema([(name, inferred)]))[name]
                features[name] = feature
            self.features = datasets.Features(features)
        return self.features

    def flush(self) -> None:
        features = self._features()
        schema = features.arrow_schema
        flat = np.concatenate(self._embeddings).reshape(-1) if self._embeddings else np.empty(0, self.dtype)
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(flat), self.dimension)]
        encoded = datasets.Features({name: features[name] for name in self.columns}).encode_batch(self._values)
        arrays += [pa.array(encoded[name], type=schema.field(name).type) for name in self.columns]
        metadata = {**(schema.metadata or {}), _SKIPPED_KEY: json.dumps(self._skipped).encode()}
        table = pa.Table.from_arrays(arrays, schema=schema.with_metadata(metadata))
        final = self.folder / f"train-r{self.rank:03d}-{self.next_number:05d}.parquet"
        temporary = self.folder / f".{final.name}.tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, final)  # a shard is complete or absent, never half written
        self.next_number += 1
        self.written_rows += self._rows
        self._reset()


def read_info(folder: str | os.PathLike) -> dict:
    """``embedding_info.json`` of an embedding folder; ValueError when it is not one."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        if shard_files(folder):
            raise ValueError(f"{folder} has embedding shards but no {INFO_FILE}: its barlow-embed run did not finish; "
                             "run the same command again to complete it.")
        raise ValueError(f"{folder} is not an embedding folder (no {INFO_FILE}); make one with barlow-embed.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def read_embeddings(folder: str | os.PathLike, columns: Sequence[str]) -> tuple[np.ndarray, dict[str, list]]:
    """All shards' embeddings as one (N, D) float32 array, and the listed columns (N values each)."""
    blocks, values = [], {c: [] for c in columns}
    for path in shard_files(folder):
        table = pq.read_table(path, columns=["embedding", *columns])
        vectors = table.column("embedding").combine_chunks()
        dimension = vectors.type.list_size
        blocks.append(vectors.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dimension))
        for name in columns:
            values[name].extend(table.column(name).to_pylist())
    if not blocks:
        return np.empty((0, 0), np.float32), values
    return np.concatenate(blocks), values
