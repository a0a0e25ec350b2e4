"""The web demo of an index (``barlow-search --serve``): upload an image, see its neighbours.

Needs Gradio, in the ``demo`` extra (``pip install -e '.[demo]'``); it is imported here only,
when the demo starts, so importing the library never imports it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["build_demo", "serve"]

logger = logging.getLogger(__name__)


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed network
    try:
        import gradio
    except ImportError:
        raise ValueError("--serve needs Gradio: pip install -e '.[demo]'.") from None
    return gradio


def _caption(index, row: int, score: float) -> str:
    value = index.columns[index.key][row]
    caption = f"{score:.3f} · {index.key} {value}"
    label_column = index.info.get("label_column")
    if label_column:
        label = index.columns[label_column][row]
        names = index.info.get("label_names")
        caption += f" · {names[label] if names and isinstance(label, int) and 0 <= label < len(names) else label}"
    return caption


def build_demo(index, encoder, k: int = 10, backend: str = "exact") -> Any:
    """A ``gradio.Blocks`` page: an image upload, and a gallery of its ``k`` nearest neighbours
    (thumbnail, cosine score, key and label)."""
    gr = _gradio()
    from .source import SourceImages, read_query_images

    images = SourceImages(index)
    info = index.info

    def neighbours(image):
        if image is None:
            return [], "Upload an image to see its neighbours."
        query = read_query_images([image], encoder.mode)
        scores, rows = index.search(encoder.embed_images(query), k=k, backend=backend)
        gallery = []
        for score, row in zip(scores[0].tolist(), rows[0].tolist()):
            picture = images[row]
            if picture is not None:
                gallery.append((picture, _caption(index, row, score)))
        return gallery, f"{len(gallery)} nearest of {len(index):,} images (cosine similarity)."

    with gr.Blocks(title="Barlow Twins image search") as demo:
        gr.Markdown(f"## Image search\nIndex: {len(index):,} images embedded with `{os.path.basename(str(info['model']))}` "
                    f"({info['dimension']}-d, {info.get('pooling')}).")
        with gr.Row():
            query = gr.Image(type="pil", label="Query image", elem_id="query", height=280)
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image to see its neighbours.", elem_id="status")
                gallery = gr.Gallery(label="Neighbours", columns=5, height="auto", elem_id="neighbours",
                                     object_fit="contain")
        query.change(neighbours, inputs=query, outputs=[gallery, status])
    return demo


def serve(index, model_name_or_path: str | None = None, k: int = 10, backend: str = "exact",
          server_name: str = "127.0.0.1", server_port: int = 7860) -> None:
    """Build the demo for ``index`` (queries embedded with its own model) and serve it until Ctrl-C."""
    _gradio()
    encoder = index.encoder(model_name_or_path)
    demo = build_demo(index, encoder, k=k, backend=backend)
    logger.info(f"Serving on http://{server_name}:{server_port} (Ctrl-C to stop).")
    demo.launch(server_name=server_name, server_port=server_port, share=False, inbrowser=False, show_error=True)
