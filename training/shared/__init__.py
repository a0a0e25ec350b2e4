"""What two or more of the commands share (pretraining, evaluation, fine-tuning, embedding): loading
image datasets, their columns and streams (:mod:`.data`: :func:`load_image_dataset`,
:func:`prepare_stream`, :func:`resolve_image_column`); decoding and collating images
(:mod:`.collate`: :class:`TwoViewCollator`, :class:`LabelledCollator`); labelled splits
(:mod:`.labelled_data`: :class:`LabelledData`, :func:`load_labelled_data`); the paper's augmentations
(:mod:`.augment`: :class:`TwoViewTransform`, :class:`TwoViewCropTransform`,
:class:`TwoViewBatchAugmentation`, :class:`ViewAugmentationParams`, :func:`barlow_twins_view_params`);
the model barlow-eval, barlow-finetune and barlow-embed start from (:mod:`.model_source`:
:class:`ModelSource`, :func:`load_model_source`); top-1 / top-5 accuracy (:mod:`.metrics`:
:func:`topk_accuracy`); the optimizer and its schedule (:mod:`.optim`: :func:`create_optimizer`,
:func:`create_scheduler`, :func:`plan_steps`); checkpoints (:mod:`.checkpointing`:
:class:`TrainerState`, :class:`Checkpointer`, :func:`save_checkpoint`, :func:`load_checkpoint`,
:func:`find_latest_checkpoint`); and the processes of a launch (:mod:`.distributed`:
:func:`create_accelerator`, :func:`all_processes`). Nothing here imports a command's own package.
"""

from .augment import (
    TwoViewBatchAugmentation,
    TwoViewCropTransform,
    TwoViewTransform,
    ViewAugmentationParams,
    barlow_twins_view_params,
)
from .checkpointing import Checkpointer, TrainerState, find_latest_checkpoint, load_checkpoint, save_checkpoint
from .collate import LabelledCollator, TwoViewCollator
from .data import load_image_dataset, prepare_stream, resolve_image_column
from .distributed import all_processes, create_accelerator
from .labelled_data import LabelledData, load_labelled_data
from .metrics import topk_accuracy
from .model_source import ModelSource, load_model_source
from .optim import create_optimizer, create_scheduler, plan_steps

__all__ = [  # by module
    "TwoViewBatchAugmentation", "TwoViewCropTransform", "TwoViewTransform", "ViewAugmentationParams",
    "barlow_twins_view_params",
    "Checkpointer", "TrainerState", "find_latest_checkpoint", "load_checkpoint", "save_checkpoint",
    "LabelledCollator", "TwoViewCollator",
    "load_image_dataset", "prepare_stream", "resolve_image_column",
    "all_processes", "create_accelerator",
    "LabelledData", "load_labelled_data",
    "topk_accuracy",
    "ModelSource", "load_model_source",
    "create_optimizer", "create_scheduler", "plan_steps",
]
