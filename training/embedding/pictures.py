"""Pictures of an index: query images beside their neighbours, and a 2-D map of the embeddings.

* :func:`save_hits_grid`: one row per query, the query first, then its hits as thumbnails with
  their score (and label).
* :func:`save_embedding_map`: t-SNE (scikit-learn), or UMAP when umap-learn is installed, of up
  to ``max_points`` embeddings, coloured by label where the index has one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage

__all__ = ["project_2d", "save_embedding_map", "save_hits_grid"]

logger = logging.getLogger(__name__)
THUMBNAIL = 1.4  # inches per image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed (or present on servers)
    import matplotlib.pyplot as plt

    return plt


def _label_name(index, value) -> str:
    names = index.info.get("label_names")
    if names and isinstance(value, int) and 0 <= value < len(names):
        return str(names[value])
    return str(value)


def save_hits_grid(index, queries: Sequence[PILImage.Image], query_names: Sequence[str], scores: torch.Tensor,
                   rows: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a PNG grid: query ``i`` in row ``i``, column 0, its hits (``rows[i]``, best first)
    after it, each captioned with its cosine score and label. A hit whose image cannot be read
    any more is shown as a blank tile captioned "unreadable"."""
    from .source import SourceImages

    plt = _pyplot()
    images = SourceImages(index)
    label_column = index.info.get("label_column")
    columns = 1 + rows.shape[1]
    figure, axes = plt.subplots(len(queries), columns, figsize=(THUMBNAIL * columns, THUMBNAIL * 1.25 * len(queries)),
                                squeeze=False)
    for i, (query, name) in enumerate(zip(queries, query_names)):
        axes[i, 0].imshow(query.convert("RGB"))
        axes[i, 0].set_title(f"query\n{os.path.basename(str(name))[:18]}", fontsize=8, color="tab:blue")
        for j, (score, row) in enumerate(zip(scores[i].tolist(), rows[i].tolist()), start=1):
            image = images[row]
            caption = f"{score:.3f}"
            if label_column:
                caption += f"\n{_label_name(index, index.columns[label_column][row])}"
            if image is None:
                image, caption = PILImage.new("RGB", (32, 32), "white"), f"{caption}\nunreadable"
            axes[i, j].imshow(image.convert("RGB"))
            axes[i, j].set_title(caption, fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def project_2d(vectors: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) -> ((N, 2), the method used): "umap" (needs umap-learn), "tsne", or "auto" (UMAP
    when installed, else t-SNE)."""
    if method not in ("auto", "tsne", "umap"):
        raise ValueError(f"The map method must be auto, tsne or umap, got {method!r}.")
    if len(vectors) < 3:
        raise ValueError(f"A 2-D map needs at least 3 embeddings, the index has {len(vectors)}.")
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ValueError("--map_method umap needs umap-learn: pip install umap-learn.") from None
        else:
            return umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(vectors), "umap"
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(vectors) - 1) / 3)
    return TSNE(n_components=2, init="pca", random_state=seed, metric="cosine", perplexity=perplexity).fit_transform(vectors), "tsne"


def save_embedding_map(index, path: str | os.PathLike, method: str = "auto", max_points: int = 5000,
                       seed: int = 0) -> dict:
    """Write a PNG scatter plot of a 2-D projection of the index (a random ``max_points`` of it,
    drawn with ``seed``), coloured by label. Returns what was drawn: method and point count."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    chosen = np.arange(len(index)) if len(index) <= max_points else np.sort(rng.choice(len(index), max_points, replace=False))
    points, used = project_2d(index.vectors[chosen].numpy(), method, seed)
    figure, axis = plt.subplots(figsize=(8, 7))
    label_column = index.info.get("label_column")
    if label_column:
        labels = [index.columns[label_column][i] for i in chosen]
        distinct = sorted(set(labels), key=str)
        colours = plt.get_cmap("tab10" if len(distinct) <= 10 else "tab20")
        for number, value in enumerate(distinct):
            mask = np.array([label == value for label in labels])
            axis.scatter(points[mask, 0], points[mask, 1], s=6, color=colours(number % colours.N),
                         label=_label_name(index, value))
        axis.legend(markerscale=3, fontsize=8, loc="best", title=label_column)
    else:
        axis.scatter(points[:, 0], points[:, 1], s=6)
    axis.set_title(f"{used.upper()} of {len(chosen)} embeddings ({os.path.basename(str(index.info.get('model')))})")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return {"method": used, "points": int(len(chosen))}
