"""Searching an embedding folder: exact cosine top-k by chunked matrix products, FAISS when
installed, near-duplicate pairs, and the Python API.

    from training.embedding import EmbeddingIndex

    index = EmbeddingIndex.load("emb")                        # a barlow-embed output folder
    results = index.search_images(["query.png"], k=10)        # embeds the queries with the index's model
    # [{"query": "query.png", "hits": [{"id": 123, "score": 0.93, "label": 4}, ...]}]   best first
    scores, rows = index.search(vectors, k=10)                # (Q, D) vectors -> (Q, k) scores and row numbers
    pairs = index.duplicates(0.95)                            # [(row_a, row_b, score)], row_a < row_b

The exact search never forms more than ``query_chunk x index_chunk`` similarities at once, so a
million 128-d vectors take 0.5 GB for the normalised matrix and little more. With faiss installed
(the ``index`` extra), ``backend="faiss"`` builds a FAISS index (``IndexFlatIP`` unless another
factory string is given, e.g. ``"HNSW32"`` for approximate search on larger sets).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .store import read_embeddings, read_info

__all__ = ["EmbeddingIndex", "ModelMismatchError", "exact_top_k", "faiss_available", "near_duplicates"]

logger = logging.getLogger(__name__)

QUERY_CHUNK = 1024
INDEX_CHUNK = 16384


class ModelMismatchError(ValueError):
    """The queries would be embedded with another model than the one that made the index."""


def faiss_available() -> bool:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each CPU variant it tries
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def exact_top_k(queries: torch.Tensor, index: torch.Tensor, k: int, query_chunk: int = QUERY_CHUNK,
                index_chunk: int = INDEX_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of (Q, D) ``queries`` against (N, D) ``index`` (normalise both for the
    cosine): ``(scores, rows)``, each (Q, min(k, N)), best first; ties go to the lower row."""
    k = min(k, index.shape[0])
    scores = torch.empty(queries.shape[0], k)
    rows = torch.empty(queries.shape[0], k, dtype=torch.long)
    for q in range(0, queries.shape[0], query_chunk):
        block = queries[q : q + query_chunk]
        best_scores = torch.full((block.shape[0], 0), float("-inf"))
        best_rows = torch.empty((block.shape[0], 0), dtype=torch.long)
        for start in range(0, index.shape[0], index_chunk):
            similarity = block @ index[start : start + index_chunk].T
            top = similarity.topk(min(k, similarity.shape[1]), dim=1)
            # Running best: the chunk's top-k merged with the best so far. Earlier rows come first,
            # so a stable sort keeps the lower row of a tie.
            merged_scores = torch.cat([best_scores, top.values], dim=1)
            merged_rows = torch.cat([best_rows, top.indices + start], dim=1)
            order = merged_scores.argsort(dim=1, descending=True, stable=True)[:, :k]
            best_scores, best_rows = merged_scores.gather(1, order), merged_rows.gather(1, order)
        scores[q : q + query_chunk], rows[q : q + query_chunk] = best_scores, best_rows
    return scores, rows


@torch.no_grad()
def near_duplicates(vectors: torch.Tensor, threshold: float, chunk: int = 4096) -> list[tuple[int, int, float]]:
    """Pairs (a, b, score) of rows of (N, D) unit ``vectors`` with cosine >= ``threshold``, a < b,
    highest score first. Memory: one chunk x N block of similarities at a time."""
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, vectors.shape[0], chunk):
        block = vectors[start : start + chunk] @ vectors[start:].T  # only b >= a's chunk: each pair once
        rows, columns = torch.nonzero(block >= threshold, as_tuple=True)
        a, b = rows + start, columns + start
        keep = a < b
        for i, j, s in zip(a[keep].tolist(), b[keep].tolist(), block[rows[keep], columns[keep]].tolist()):
            pairs.append((i, j, s))
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs


@dataclass
class EmbeddingIndex:
    """The vectors of an embedding folder, normalised, with each row's key, label and kept columns.

    ``vectors``: (N, D) float32, unit length. ``columns``: name -> N values (``id`` or ``path``,
    the label, kept columns). ``info``: the folder's embedding_info.json.
    """

    vectors: torch.Tensor
    columns: dict[str, list]
    info: dict
    folder: Path | None = None
    _faiss: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "EmbeddingIndex":
        """Read a barlow-embed folder. ValueError for a folder that is not one, or holds no vectors."""
        info = read_info(folder)
        names = [info["key"], *([info["label_column"]] if info.get("label_column") else []), *info.get("keep_columns", [])]
        vectors, columns = read_embeddings(folder, names)
        if len(vectors) == 0:
            raise ValueError(f"The index {folder} is empty: it holds no embeddings ({info.get('skipped', 0)} images "
                             "were unreadable). Embed a dataset with images first.")
        tensor = F.normalize(torch.from_numpy(vectors), dim=1)
        return cls(tensor, columns, info, Path(folder))

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def key(self) -> str:
        return self.info.get("key", "id")

    def row(self, number: int) -> dict[str, Any]:
        """One row's stored columns: its key first, then the label and kept columns."""
        return {name: values[number] for name, values in self.columns.items()}

    # ------------------------------------------------------------------------------------ search
    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10, backend: str = "exact",
               faiss_index: str = "Flat") -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine top-k of (Q, D) query vectors: ``(scores, rows)``, each (Q, min(k, N)), best first.

        ``backend``: "exact" (chunked matrix products), "faiss" (an index built with the factory
        string ``faiss_index`` on first use, then kept) or "auto" (faiss when installed)."""
        queries = torch.as_tensor(queries, dtype=torch.float32)
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"Queries must be (Q, {self.vectors.shape[1]}) vectors to search this index, got "
                             f"{tuple(queries.shape)}.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        queries = F.normalize(queries, dim=1)
        if backend == "auto":
            backend = "faiss" if faiss_available() else "exact"
        if backend == "exact":
            return exact_top_k(queries, self.vectors, k)
        if backend == "faiss":
            return self._faiss_search(queries, k, faiss_index)
        raise ValueError(f"backend must be 'exact', 'faiss' or 'auto', got {backend!r}.")

    def _faiss_search(self, queries: torch.Tensor, k: int, factory: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not faiss_available():
            raise ValueError("The faiss backend needs faiss: pip install -e '.[index]' (faiss-cpu).")
        import faiss

        if factory not in self._faiss:
            index = faiss.index_factory(self.vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
            vectors = np.ascontiguousarray(self.vectors.numpy())
            if not index.is_trained:
                index.train(vectors)
            index.add(vectors)
            self._faiss[factory] = index
        scores, rows = self._faiss[factory].search(np.ascontiguousarray(queries.numpy()), min(k, len(self)))
        return torch.from_numpy(scores), torch.from_numpy(rows).long()

    def hits(self, scores: torch.Tensor, rows: torch.Tensor) -> list[list[dict[str, Any]]]:
        """Search results as JSON-ready hits: per query, ``{key, "score", label, kept...}``, best first."""
        def hit(score: float, row: int) -> dict[str, Any]:
            values = self.row(row)
            return {self.key: values.pop(self.key), "score": round(score, 6), **values}

        # FAISS marks missing neighbours (fewer than k vectors) with row -1.
        return [[hit(s, r) for s, r in zip(q_scores.tolist(), q_rows.tolist()) if r >= 0]
                for q_scores, q_rows in zip(scores, rows)]

    def duplicates(self, threshold: float) -> list[tuple[int, int, float]]:
        """Near-duplicate pairs within the index: (row a, row b, cosine) with cosine >= threshold."""
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"The duplicate threshold is a cosine similarity in [-1, 1], got {threshold}.")
        return near_duplicates(self.vectors, threshold)

    # ---------------------------------------------------------------------------- image queries
    def encoder(self, model_name_or_path: str | None = None):
        """The model the index was made with (loaded from the name it records). A different model
        (``model_name_or_path`` whose weights differ) is refused, naming both."""
        from .encoder import load_encoder

        recorded = self.info["model"]
        encoder = load_encoder(model_name_or_path or recorded)
        self.check_encoder(encoder)
        return encoder

    def check_encoder(self, encoder) -> None:
        """ValueError naming both models when ``encoder`` is not the model that made the index."""
        recorded, identity = self.info["model"], self.info.get("model_identity")
        if encoder.identity != identity or encoder.pooling != self.info.get("pooling"):
            raise ModelMismatchError(
                f"The index {self.folder or ''} was made with {recorded}, but the queries would be embedded with "
                f"{encoder.name}{' (whose weights have changed since)' if encoder.name == recorded else ''}: their "
                "vectors are not comparable. Search with the model that made the index, or embed the dataset again "
                "with this one."
            )
        if encoder.dimension != self.vectors.shape[1]:
            raise ValueError(f"{encoder.name} gives {encoder.dimension}-d vectors; the index holds "
                             f"{self.vectors.shape[1]}-d ones.")

    def search_images(self, images: Sequence[Any], k: int = 10, encoder=None, backend: str = "exact",
                      batch_size: int = 64) -> list[dict[str, Any]]:
        """Embed ``images`` (paths or PIL images) with the index's model and search:
        ``[{"query": path or position, "hits": [...]}, ...]``, one entry per image, hits best first.
        An unreadable image raises ValueError naming it."""
        from .source import read_query_images

        encoder = encoder or self.encoder()
        self.check_encoder(encoder)
        decoded = read_query_images(images, encoder.mode)
        vectors = encoder.embed_images(decoded, batch_size=batch_size)
        scores, rows = self.search(vectors, k=k, backend=backend)
        names = [str(image) if isinstance(image, (str, os.PathLike)) else i for i, image in enumerate(images)]
        return [{"query": name, "hits": hits} for name, hits in zip(names, self.hits(scores, rows))]
