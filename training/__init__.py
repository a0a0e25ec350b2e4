"""Training, evaluation and fine-tuning of Barlow Twins models, driven by Accelerate.

Entry points: `barlow-pretrain` (`training.pretrain`). The pieces below are the public API for
writing your own loop. Each command's own parts are in its package (`pretraining/`, `evaluation/`,
`finetuning/`, `embedding/`); what two or more of them use is in `shared/`.
"""

from .arguments import DataArguments, ModelArguments, OutputArguments, PretrainingArguments
from .evaluation import extract_features, knn_top1
from .shared import (
    LabelledCollator,
    TrainerState,
    TwoViewBatchAugmentation,
    TwoViewCollator,
    TwoViewCropTransform,
    TwoViewTransform,
    ViewAugmentationParams,
    barlow_twins_view_params,
    create_optimizer,
    create_scheduler,
    find_latest_checkpoint,
    load_checkpoint,
    load_image_dataset,
    prepare_stream,
    resolve_image_column,
    save_checkpoint,
    topk_accuracy,
)


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
