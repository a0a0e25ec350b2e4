"""barlow-embed: embed every image of a dataset split into parquet shards, for search and maps.

    barlow-embed --model_name_or_path out --dataset_name path/to/parquet --output_dir emb
    barlow-embed --model_name_or_path local-dir:/path/to/timm_model --train_dir images --output_dir emb
    torchrun --nproc_per_node 2 -m training.embedding.embed ...      # or: accelerate launch -m ...

The model is a barlow-pretrain folder or checkpoint, a saved encoder, any image model that
transformers' AutoModel loads (TimmWrapper repositories, ViT, ResNet, ...), or a timm
hf-hub:/local-dir: name; images are preprocessed by the model's own image processor. The data
options are barlow-pretrain's (with none, scikit-learn's digits).

The output folder loads with `datasets.load_dataset(output_dir)`: a column `embedding` (float32,
or float16 with --embedding_dtype float16), `path` (relative to the image folder, for an image
folder) or `id` (the example's index in the split), the label and --keep_columns. Its
embedding_info.json records the model, dimension, pooling, count, skipped images and the command;
barlow-search reads it. Unreadable images are skipped and counted. Shards are written as they
fill, so memory stays flat; run the same command again after an interruption and it continues
after the last complete shard. Launched on several processes, each embeds its own part of the
stream (no example twice).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from barlow_cli import CommandFailed, UsageError, parse_arguments, prepare_output_dir, run_command, setup_logging

from ..arguments import DataArguments, OutputArguments, PretrainingArguments, SupervisedDataArguments, shared_field
from ..shared.collate import ImageCollator
from ..shared.labelled_data import data_identity
from .encoder import ImageEncoder, load_encoder
from .store import INFO_FILE, RUN_FILE, RUN_FILES, ShardWriter, read_info, summarize, write_json_atomically, written_keys
from .stream import INDEX_COLUMN, PATH_COLUMN, EmbeddingSource, keyed_stream, open_source

__all__ = ["EmbeddingArguments", "EmbeddingCollator", "embed", "main"]

logger = logging.getLogger(__name__)
PROG = "barlow-embed"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EmbeddingArguments:
    """The model, the output folder and how the embeddings are computed and stored."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A barlow-pretrain output folder or checkpoint, a saved encoder, an image model that "
                          "transformers' AutoModel loads (folder or hub id), or a timm hf-hub:<repo> or "
                          "local-dir:<folder> name (required)."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the parquet shards and embedding_info.json "
                                                                   "are written (required)."})
    per_device_eval_batch_size: int = shared_field(SupervisedDataArguments, "per_device_eval_batch_size")
    embedding_dtype: str = field(default="float32", metadata={"help": "How the embeddings are stored.",
                                                              "choices": ["float32", "float16"]})
    l2_normalize: bool = field(default=False, metadata={"help": "Store unit-length embeddings (cosine similarity "
                                                                "becomes a dot product). Search normalises either way."})
    keep_columns: list[str] = field(default_factory=list, metadata={"help": "Source columns to store beside each "
                                                                            "embedding (the label always is)."})
    rows_per_shard: int = field(default=10_000, metadata={"help": "Embeddings per parquet shard (a shard closes at the first batch that reaches it): what a resumed run "
                                                                  "may redo, and what is held in memory."})
    mixed_precision: str = shared_field(
        PretrainingArguments, "mixed_precision",
        help="Run the model under bf16 or fp16 autocast (embeddings are stored as --embedding_dtype).",
    )
    channels_last: bool = shared_field(PretrainingArguments, "channels_last")
    torch_compile: bool = shared_field(PretrainingArguments, "torch_compile")
    overwrite_output_dir: bool = shared_field(
        OutputArguments, "overwrite_output_dir",
        help="Replace the earlier embedding in --output_dir (without it, the same command resumes it and a different "
             "one is refused).",
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required.")
        if not self.output_dir:
            raise ValueError("--output_dir is required.")
        for name in ("per_device_eval_batch_size", "rows_per_shard"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")


@dataclass
class EmbeddingDataArguments(DataArguments):
    """Where the images come from (barlow-pretrain's options). With none, scikit-learn's digits."""

    train_split: str = field(default="train", metadata={"help": "The split to embed."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Not used: the split is read in its own order."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Embed only the split's first N examples."})


class EmbeddingCollator(ImageCollator):
    """Undecoded examples -> ``{"pixel_values": (B, C, H, W), "columns": {name: B values},
    "skipped": [keys of unreadable images]}``, B = the readable images, preprocessed as a batch
    by the model's image processor."""

    def __init__(self, encoder: ImageEncoder, source: EmbeddingSource) -> None:
        super().__init__(None, source.image_column, 3 if encoder.mode == "RGB" else 1)
        self.preprocess, self.source = encoder.preprocess, source
        self._key = PATH_COLUMN if source.key == "path" else INDEX_COLUMN

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        images, kept, _ = self._decode_all(examples)
        kept_ids = {id(example) for example in kept}
        columns = {name: [example[self._key if name == self.source.key else name] for example in kept]
                   for name in self.source.columns}
        return {
            "pixel_values": self.preprocess(images) if images else None,
            "columns": columns,
            "skipped": [example[self._key] for example in examples if id(example) not in kept_ids],
        }


def _run_settings(args: EmbeddingArguments, data_args: DataArguments, encoder: ImageEncoder, source) -> dict:
    """What makes two runs the same embedding (a resume), and not merely the same options."""
    return {
        "model": encoder.name, "model_identity": encoder.identity, "pooling": encoder.pooling,
        "data": {**data_identity(data_args), "split": data_args.train_split, "image_column": source.image_column,
                 "max_train_samples": data_args.max_train_samples},
        "key": source.key, "keep_columns": source.keep_columns, "dtype": args.embedding_dtype,
        "l2_normalize": args.l2_normalize, "mixed_precision": args.mixed_precision,
    }


def _prepare_folder(args: EmbeddingArguments, settings: dict, state) -> bool:
    """The output folder policy: a new folder, the same command again (resume: True), or a
    different earlier embedding (refused unless --overwrite_output_dir)."""
    folder = Path(args.output_dir)
    run_file = folder / RUN_FILE
    earlier = json.loads(run_file.read_text()) if run_file.is_file() else None
    resume = earlier == settings and not args.overwrite_output_dir
    if earlier is not None and earlier != settings and not args.overwrite_output_dir:
        changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
        raise UsageError(f"--output_dir {folder} holds an embedding made with other settings ({', '.join(changed)} "
                         "differ). Choose another folder, or pass --overwrite_output_dir to replace it.")
    prepare_output_dir(folder, RUN_FILES, overwrite=args.overwrite_output_dir, resume=resume,
                       resume_hint="run the command that made it again to resume it")
    state.wait_for_everyone()
    if state.is_main_process:
        (folder / INFO_FILE).unlink(missing_ok=True)  # rewritten when this run completes
        write_json_atomically(run_file, settings)
    state.wait_for_everyone()
    return resume


def _label_names(source: EmbeddingSource) -> list[str] | None:
    feature = source.feature(source.label_column) if source.label_column else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def embed(args: EmbeddingArguments, data_args: DataArguments) -> dict:
    """Embed the split; returns the contents of embedding_info.json."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Without a GPU, accelerate takes several launched processes as one gloo job only when told so.
    state = PartialState(cpu=launched > 1 and not torch.cuda.is_available())
    started = time.perf_counter()
    encoder = load_encoder(args.model_name_or_path)
    source = open_source(data_args, args.keep_columns)
    settings = _run_settings(args, data_args, encoder, source)
    resume = _prepare_folder(args, settings, state)
    done = written_keys(args.output_dir, source.key) if resume else set()
    if done:
        logger.info(f"Resuming: {len(done)} examples are already in complete shards of {args.output_dir}.")

    encoder.to(state.device, channels_last=args.channels_last, compile=args.torch_compile,
               autocast_dtype=_DTYPES.get(args.mixed_precision))
    stream = keyed_stream(source, process_index=state.process_index, num_processes=state.num_processes,
                          max_samples=data_args.max_train_samples, done=done)
    loader = DataLoader(
        stream, batch_size=args.per_device_eval_batch_size, collate_fn=EmbeddingCollator(encoder, source),
        num_workers=data_args.dataloader_num_workers, pin_memory=state.device.type == "cuda",
    )
    writer = ShardWriter(args.output_dir, state.process_index, encoder.dimension, args.embedding_dtype,
                         source.columns, {c: source.feature(c) for c in source.columns}, args.rows_per_shard)
    total = None
    if source.num_examples is not None:
        total = max(0, source.num_examples - len(done)) // state.num_processes
    skipped = processed = 0
    loop_started = time.perf_counter()
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="img", desc="embedding", disable=not state.is_local_main_process,
              dynamic_ncols=True) as bar:
        for batch in loader:
            vectors = np.empty((0, encoder.dimension), np.float32)
            if batch["pixel_values"] is not None:
                embeddings = encoder(batch["pixel_values"])
                if args.l2_normalize:
                    embeddings = torch.nn.functional.normalize(embeddings, dim=1)
                vectors = embeddings.cpu().numpy()
            writer.add(vectors, batch["columns"], batch["skipped"])
            skipped += len(batch["skipped"])
            processed += len(vectors) + len(batch["skipped"])
            bar.update(len(vectors) + len(batch["skipped"]))
            bar.set_postfix(skipped=skipped, refresh=False)
        writer.close()
    loop_s = time.perf_counter() - loop_started
    state.wait_for_everyone()

    info = None
    if state.is_main_process:
        summary = summarize(args.output_dir)
        elapsed = time.perf_counter() - started
        info = {
            "model": encoder.name, "model_identity": encoder.identity, "dimension": encoder.dimension,
            "pooling": encoder.pooling, "count": summary["count"], "skipped": summary["skipped"],
            "dtype": args.embedding_dtype, "normalisation": "l2" if args.l2_normalize else "none",
            "key": source.key, "label_column": source.label_column, "label_names": _label_names(source),
            "keep_columns": source.keep_columns,
            "source": {**settings["data"], "dataset_name": data_args.dataset_name, "train_dir": data_args.train_dir,
                       "dataset_config_name": data_args.dataset_config_name, "root": source.root},
            "shards": summary["shards"], "num_processes": state.num_processes, "resumed": resume,
            "mixed_precision": args.mixed_precision, "wall_time_s": round(elapsed, 2),
            # This run's reading, decoding, preprocessing, forward and writing, on the main process.
            "embedding_loop_s": round(loop_s, 2), "images_per_second": round(processed / loop_s, 1) if loop_s else None,
            "command": shlex.join(["barlow-embed", *sys.argv[1:]]),
        }
        write_json_atomically(Path(args.output_dir) / INFO_FILE, info)
        logger.info(f"Embedded {info['count']} images ({info['skipped']} unreadable, skipped) into {args.output_dir} "
                    f"in {elapsed:.1f} s.")
    state.wait_for_everyone()
    info = info if info is not None else read_info(args.output_dir)
    if info["count"] == 0:
        raise CommandFailed(f"No image could be embedded ({info['skipped']} unreadable); {args.output_dir} holds no "
                            "embeddings.")
    return info


def main(argv: list[str] | None = None) -> None:
    """The barlow-embed command: 0 on success, 1 when it failed, 2 for an option or input to change."""
    args, data_args = parse_arguments((EmbeddingArguments, EmbeddingDataArguments), argv, description=__doc__)
    setup_logging()
    run_command(PROG, lambda: embed(args, data_args))


if __name__ == "__main__":
    main()
