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

from .collate import LabelledCollator
from .data import load_image_dataset, prepare_stream, resolve_image_column, resolve_label_column
from .features import extract_features, knn_top1
from .plots import plot_cross_correlation, summarise_cross_correlation


__all__ = ["KnnMonitor", "eval_transform", "held_out_examples", "labelled_loaders", "plot_held_out_cross_correlation"]

logger = logging.getLogger(__name__)
HELD_OUT_SPLITS = ("validation", "test")
PLOT_BATCH = 256


def eval_transform(config: BarlowTwinsConfig) -> Callable[[Any], torch.Tensor]:
    """PIL image -> (C, S, S): the model's own image processor, so evaluation sees exactly the
    preprocessing that users of the saved model get."""
    processor = create_image_processor(config)
    return lambda image: processor(image, return_tensors="pt")["pixel_values"][0]


def _dataset_name(name: str) -> str | None:
    return None if name == "default" else name


def _load_held_out(dataset_name: str | None, **kwargs) -> tuple[Any, str] | None:
    for split in HELD_OUT_SPLITS:
        try:
            return load_image_dataset(dataset_name, split=split, **kwargs), split
        except (ValueError, KeyError, FileNotFoundError):
            continue
    return None


def labelled_loaders(dataset: str, config: BarlowTwinsConfig, batch_size: int = 256) -> tuple[DataLoader, DataLoader]:
    """Loaders of (pixel_values, labels) for a labelled dataset's train split and its validation
    or test split ('default': scikit-learn's digits), preprocessed as the model's processor does."""
    name = _dataset_name(dataset)
    train = load_image_dataset(name, split="train", streaming=False)
    held_out = _load_held_out(name, streaming=False)
    if held_out is None:
        raise ValueError(f"Evaluation dataset {dataset} needs a 'validation' or 'test' split.")
    image_column = resolve_image_column(train)
    label_column = resolve_label_column(train)
    if label_column is None:
        raise ValueError(f"Evaluation dataset {dataset} has no label column ({train.column_names}).")
    collator = LabelledCollator(eval_transform(config), image_column, label_column, config.num_channels)
    return tuple(DataLoader(split, batch_size=batch_size, collate_fn=collator) for split in (train, held_out[0]))


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


def _first_examples(dataset: Any, count: int) -> list[dict]:
    # Undecoded, like training examples: the collator decodes and skips unreadable images.
    stream = prepare_stream(dataset, resolve_image_column(dataset), shuffle=False)
    return list(stream.take(count))


def held_out_examples(data_args, count: int) -> tuple[list[dict], str, str]:
    """The first `count` undecoded examples of the training data's validation or test split, or
    of its training split when it has neither; with their image column and which it was
    ("held-out" or "training"). The C plot and the collapse monitor look at these images."""
    name = data_args.train_dir or data_args.dataset_name
    kwargs = {"dataset_config_name": data_args.dataset_config_name, "streaming": True, "cache_dir": data_args.cache_dir}
    held_out = None if data_args.train_dir else _load_held_out(name, **kwargs)
    source = "held-out"
    if held_out is None:
        dataset = load_image_dataset(data_args.dataset_name, split=data_args.train_split, train_dir=data_args.train_dir, **kwargs)
        source = "training"
    else:
        dataset = held_out[0]
    image_column = resolve_image_column(dataset)
    return _first_examples(dataset, count), image_column, source


def plot_held_out_cross_correlation(
    model: BarlowTwinsForPreTraining,
    data_args,
    collator: Callable[[list[dict]], dict],
    to_views: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
    accelerator: Accelerator,
    path: Path,
) -> dict[str, float]:
    """Plot C for two augmented views of a held-out batch (the dataset's validation or test split
    when it has one, else its first training images), the model in eval mode. `to_views` turns a
    collated batch into the two model inputs, as in training.

    Every process computes the same batch, so the global C equals the local one."""
    examples, _, source = held_out_examples(data_args, PLOT_BATCH)
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
