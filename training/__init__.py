"""Training, evaluation and fine-tuning of Barlow Twins models, driven by Accelerate.

Entry points: `barlow-pretrain` (`training.pretrain`). The pieces below are the public API for
writing your own loop.
"""

from .arguments import DataArguments, ModelArguments, OutputArguments, PretrainingArguments
from .augment import (
    TwoViewBatchAugmentation,
    TwoViewCropTransform,
    TwoViewTransform,
    ViewAugmentationParams,
    barlow_twins_view_params,
)
from .checkpointing import TrainerState, find_latest_checkpoint, load_checkpoint, save_checkpoint
from .collate import LabelledCollator, TwoViewCollator
from .data import load_image_dataset, prepare_stream, resolve_image_column
from .features import extract_features, knn_top1
from .metrics import topk_accuracy
from .optim import create_optimizer, create_scheduler


__all__ = [
    "DataArguments",
    "LabelledCollator",
    "ModelArguments",
    "OutputArguments",
    "PretrainingArguments",
    "TrainerState",
    "TwoViewBatchAugmentation",
    "TwoViewCollator",
    "TwoViewCropTransform",
    "TwoViewTransform",
    "ViewAugmentationParams",
    "barlow_twins_view_params",
    "create_optimizer",
    "create_scheduler",
    "extract_features",
    "find_latest_checkpoint",
    "knn_top1",
    "load_checkpoint",
    "load_image_dataset",
    "prepare_stream",
    "resolve_image_column",
    "save_checkpoint",
    "topk_accuracy",
]
