"""What the trainer shows while and after it runs: the kNN monitor and the C plot."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, create_image_processor, cross_correlation

from ..arguments import DataArguments, SupervisedDataArguments
from ..evaluation import extract_features, knn_top1
from ..shared.data import load_held_out_split, load_image_dataset, prepare_stream, resolve_image_column
from ..shared.labelled_data import load_labelled_data
from ..shared.model_source import processor_transform
from .plots import plot_cross_correlation, summarise_cross_correlation


__all__ = ["KnnMonitor", "held_out_examples", "labelled_loaders", "plot_held_out_cross_correlation"]

logger = logging.getLogger(__name__)
PLOT_BATCH = 256


def labelled_loaders(dataset: str, config: BarlowTwinsConfig, batch_size: int = 256) -> tuple[DataLoader, DataLoader]:
    """Loaders of (pixel_values, labels) for a labelled dataset's train split and its validation
    or test split ('default': scikit-learn's digits), preprocessed as the model's processor does."""
    data = load_labelled_data(
        DataArguments(dataset_name=None if dataset == "default" else dataset, streaming=False), SupervisedDataArguments()
    )
    transform = processor_transform(create_image_processor(config))
    return tuple(data.loader(split, transform, config.num_channels, batch_size) for split in ("train", "eval"))


@dataclass
class KnnMonitor:
    """kNN top-1 (cosine, votes weighted by exp(sim / T)) of the encoder's features on a labelled
    dataset's train and held-out splits. Runs on the main process only."""

    accelerator: Accelerator
    train_loader: DataLoader
    test_loader: DataLoader
    k: int
    temperature: float

    @classmethod
    def create(cls, out_args, config: BarlowTwinsConfig, accelerator: Accelerator) -> "KnnMonitor":
        train_loader, test_loader = labelled_loaders(out_args.knn_eval_dataset, config)
        return cls(accelerator, train_loader, test_loader, out_args.knn_k, out_args.knn_temperature)

    def evaluate(self, encoder: torch.nn.Module, step: int) -> float | None:
        top1 = None
        if self.accelerator.is_main_process:
            device = self.accelerator.device
            train_features, train_labels = extract_features(encoder, self.train_loader, device)
            test_features, test_labels = extract_features(encoder, self.test_loader, device)
            top1 = knn_top1(train_features, train_labels, test_features, test_labels, k=self.k, temperature=self.temperature)
            self.accelerator.log({"knn_top1": top1}, step=step)
            logger.info(f"step {step}: kNN top-1 {top1:.4f} (k={self.k}, T={self.temperature})")
        self.accelerator.wait_for_everyone()
        return top1


def _first_examples(dataset: Any, image_column: str, count: int) -> list[dict]:
    # Undecoded, like training examples: the collator decodes and skips unreadable images.
    stream = prepare_stream(dataset, image_column, shuffle=False)
    return list(stream.take(count))


def held_out_examples(data_args, image_column: str, count: int) -> tuple[list[dict], str]:
    """The first `count` undecoded examples of the training data's validation or test split when it
    has one with the training's `image_column`, else of its training split; and which it was
    ("held-out" or "training"). The C plot and the collapse monitor look at these images."""
    try:
        dataset, _ = load_held_out_split(data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir,
                                         streaming=True, cache_dir=data_args.cache_dir)
        resolve_image_column(dataset, image_column)  # a held-out split may name its columns otherwise
        source = "held-out"
    except ValueError:
        dataset = load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.train_split,
                                     data_args.train_dir, streaming=True, cache_dir=data_args.cache_dir)
        source = "training"
    return _first_examples(dataset, image_column, count), source


def plot_held_out_cross_correlation(
    model: BarlowTwinsForPreTraining,
    data_args,
    image_column: str,
    collator: Callable[[list[dict]], dict],
    to_views: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
    accelerator: Accelerator,
    path: Path,
) -> dict[str, float]:
    """Plot C for two augmented views of a held-out batch (the dataset's validation or test split
    when it has one with the training's ``image_column``, else its first training images), the
    model in eval mode. `to_views` turns a collated batch into the two model inputs, as in training.

    Every process computes the same batch, so the global C equals the local one."""
    examples, source = held_out_examples(data_args, image_column, PLOT_BATCH)
    batch = collator(examples)
    if batch["pixel_values"].shape[0] < 2:
        logger.warning("No readable batch to plot the cross-correlation matrix.")
        return {}
    view_1, view_2 = to_views(batch)
    was_training = model.training
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        z1 = model(pixel_values=view_1).projections
        z2 = model(pixel_values=view_2).projections
    model.train(was_training)
    matrix = cross_correlation(z1, z2)
    summary = summarise_cross_correlation(matrix)
    if accelerator.is_main_process:
        plot_cross_correlation(matrix, path, title=f"Barlow Twins C on {z1.shape[0]} {source} images")
    return summary
