"""Embed a whole dataset, search it, and look at it.

* ``barlow-embed`` (:mod:`.embed`): a dataset split -> parquet shards of embeddings and
  ``embedding_info.json``.
* ``barlow-search`` (:mod:`.search`): nearest neighbours of query images, near-duplicate pairs, a
  picture grid of the hits, a 2-D map, and a web demo (``--serve``, the ``demo`` extra).
* Python: :class:`EmbeddingIndex` (:mod:`.index`) and :func:`load_encoder` (:mod:`.encoder`).

Importing this package imports neither gradio nor faiss; they are loaded when used.
"""

from .encoder import ImageEncoder, load_encoder
from .index import EmbeddingIndex

__all__ = ["EmbeddingIndex", "ImageEncoder", "load_encoder"]
