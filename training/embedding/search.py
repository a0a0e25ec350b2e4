"""barlow-search: nearest neighbours, near-duplicates, pictures and a web demo of a barlow-embed folder.

    barlow-search --index_dir emb --query a.png b.jpg --k 10 --output_file hits.json --grid hits.png
    barlow-search --index_dir emb --duplicates 0.98 --output_file duplicates.json
    barlow-search --index_dir emb --map map.png                  # t-SNE (UMAP when installed), coloured by label
    barlow-search --index_dir emb --serve                        # upload an image, see its neighbours (pip install -e '.[demo]')

Queries are embedded with the model that made the index (embedding_info.json records it) and
compared by cosine similarity: exactly, by chunked matrix products, or with FAISS when it is
installed (pip install -e '.[index]'; --backend). The results are JSON, one entry per query,
best hit first:

    [{"query": "a.png", "hits": [{"id": 4711, "score": 0.93, "label": 3}, ...]}, ...]

with "path" instead of "id" for an index of an image folder, and the label and kept columns.
--duplicates lists the pairs of indexed images whose similarity is at least the threshold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from barlow_cli import UsageError, parse_arguments, run_command, setup_logging

__all__ = ["SearchArguments", "main", "search"]

logger = logging.getLogger(__name__)
PROG = "barlow-search"


@dataclass
class SearchArguments:
    """The index, what to do with it, and where the results go."""

    index_dir: str | None = field(default=None, metadata={"help": "A barlow-embed output folder (required)."})
    query: list[str] = field(default_factory=list, metadata={"help": "Image files whose neighbours to find."})
    k: int = field(default=10, metadata={"help": "Neighbours per query."})
    output_file: str | None = field(default=None, metadata={"help": "Write the JSON results here instead of "
                                                                     "printing them."})
    grid: str | None = field(default=None, metadata={"help": "With --query: a PNG of each query beside its "
                                                             "neighbours' thumbnails."})
    duplicates: float | None = field(default=None, metadata={"help": "List the pairs of indexed images with cosine "
                                                                     "similarity >= this threshold (e.g. 0.98)."})
    map: str | None = field(default=None, metadata={"help": "Write a PNG map of the embeddings in 2-D, coloured by "
                                                            "label."})
    map_method: str = field(default="auto", metadata={"help": "auto: UMAP when umap-learn is installed, else t-SNE.",
                                                      "choices": ["auto", "tsne", "umap"]})
    map_max_points: int = field(default=5000, metadata={"help": "Draw a random sample of at most this many points."})
    backend: str = field(default="auto", metadata={"help": "exact: chunked matrix products; faiss: a FAISS index "
                                                           "(needs faiss-cpu); auto: faiss when installed.",
                                                   "choices": ["auto", "exact", "faiss"]})
    faiss_index: str = field(default="Flat", metadata={"help": "FAISS index factory string: Flat (exact) or e.g. "
                                                               "HNSW32 (approximate, for millions of vectors)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Embed the queries with this model "
                                                                           "(e.g. the index's model, moved); it must be "
                                                                           "the model that made the index."})
    serve: bool = field(default=False, metadata={"help": "Start a web page where you upload an image and see its "
                                                         "neighbours (needs the demo extra: gradio)."})
    server_name: str = field(default="127.0.0.1", metadata={"help": "With --serve: the address to listen on "
                                                                    "(0.0.0.0 for other machines)."})
    server_port: int = field(default=7860, metadata={"help": "With --serve: the port."})
    seed: int = field(default=0, metadata={"help": "Seed of the map's sample and projection."})

    def __post_init__(self):
        if not self.index_dir:
            raise ValueError("--index_dir is required: a folder made by barlow-embed.")
        if not (self.query or self.duplicates is not None or self.map or self.serve):
            raise ValueError("Nothing to do: give --query IMAGE..., --duplicates THRESHOLD, --map FILE.png or --serve.")
        if self.query and self.duplicates is not None:
            raise ValueError("Give either --query or --duplicates: their results go to the same --output_file.")
        if self.serve and (self.query or self.duplicates is not None):
            raise ValueError("--serve starts the web page on its own: drop --query and --duplicates.")
        if self.grid and not self.query:
            raise ValueError("--grid shows query results: give --query too.")
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}.")
        if self.duplicates is not None and not -1 <= self.duplicates <= 1:
            raise ValueError(f"--duplicates is a cosine similarity in [-1, 1], got {self.duplicates}.")
        if self.map_max_points < 3:
            raise ValueError("--map_max_points must be at least 3.")


def _write(results, output_file: str | None) -> None:
    text = json.dumps(results, indent=2, ensure_ascii=False)
    if output_file:
        Path(output_file).write_text(text + "\n")
        logger.info(f"Wrote {output_file}.")
    else:
        print(text)


def search(args: SearchArguments) -> None:
    from .index import EmbeddingIndex, ModelMismatchError, faiss_available

    if not Path(args.index_dir).is_dir():
        raise UsageError(f"--index_dir {args.index_dir}: no such folder.")
    if args.backend == "faiss" and not faiss_available():
        raise UsageError("--backend faiss needs faiss: pip install -e '.[index]' (faiss-cpu).")
    index = EmbeddingIndex.load(args.index_dir)
    if args.map:
        from .pictures import save_embedding_map

        drawn = save_embedding_map(index, args.map, args.map_method, args.map_max_points, args.seed)
        logger.info(f"Wrote {args.map}: {drawn['method']} of {drawn['points']} embeddings.")
    if args.serve:
        from .web import serve

        serve(index, args.model_name_or_path, k=args.k, backend=args.backend, server_name=args.server_name,
              server_port=args.server_port)
        return
    if args.duplicates is not None:
        pairs = index.duplicates(args.duplicates)
        _write([{"score": round(s, 6), "a": index.row(a), "b": index.row(b)} for a, b, s in pairs], args.output_file)
        logger.info(f"{len(pairs)} pairs with similarity >= {args.duplicates}.")
        return
    if args.query:
        try:
            encoder = index.encoder(args.model_name_or_path)
        except ModelMismatchError as error:  # --model_name_or_path names another model: exit status 2
            raise UsageError(str(error)) from None
        from .source import read_query_images

        images = read_query_images(args.query, encoder.mode)
        vectors = encoder.embed_images(images)
        scores, rows = index.search(vectors, k=args.k, backend=args.backend, faiss_index=args.faiss_index)
        results = [{"query": name, "hits": hits} for name, hits in zip(args.query, index.hits(scores, rows))]
        _write(results, args.output_file)
        if args.grid:
            from .pictures import save_hits_grid

            save_hits_grid(index, images, args.query, scores, rows, args.grid)
            logger.info(f"Wrote {args.grid}.")


def main(argv: list[str] | None = None) -> None:
    """The barlow-search command: 0 on success, 1 when it failed, 2 for an option or input to change."""
    (args,) = parse_arguments((SearchArguments,), argv, description=__doc__)
    setup_logging()
    run_command(PROG, lambda: search(args))


if __name__ == "__main__":
    main()
