"""Options of `barlow-finetune --task object-detection|semantic-segmentation`.

The data, model and optimisation options are barlow-finetune's own (`DataArguments`,
`PretrainedModelArguments`, and `FinetuningArguments` / `SupervisedDataArguments` fields reused
through `shared_field`), with defaults for dense heads: AdamW, backbone 1e-5, head 1e-4, weight decay
1e-4, gradient clipping at 0.1, as DETR is trained.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from barlow_cli import read_config_file

from ...arguments import SupervisedDataArguments, _positive, shared_field
from ..arguments import FinetuningArguments, check_finetuning_options


__all__ = ["DENSE_TASKS", "DenseFinetuningArguments", "DenseTaskArguments", "requested_task"]

DENSE_TASKS = ("object-detection", "semantic-segmentation")
BBOX_FORMATS = ("coco", "pascal_voc")


def requested_task(argv: list[str] | None = None) -> str | None:
    """The `--task` of a command line (or of its `--config` file), read before parsing: barlow-finetune
    hands detection and segmentation to their own script, whose options differ."""
    argv = list(sys.argv[1:] if argv is None else argv)
    task = config = None
    for i, arg in enumerate(argv):
        for name in ("--task", "--config"):
            value = arg.split("=", 1)[1] if arg.startswith(name + "=") else (
                argv[i + 1] if arg == name and i + 1 < len(argv) else None)
            if value is not None:
                task, config = (value, config) if name == "--task" else (task, value)
    if task is None and config is not None:
        try:
            task = read_config_file(config).get("task")
        except ValueError:
            return None  # the parser reports the bad file
    return task


@dataclass
class DenseTaskArguments:
    """The task, where its annotations are, and the head on the encoder."""

    task: str | None = field(
        default=None,
        metadata={"help": "object-detection (DETR on the encoder) or semantic-segmentation (UperNet on the encoder).",
                  "choices": list(DENSE_TASKS)},
    )
    objects_column: str | None = field(
        default=None,
        metadata={"help": "object-detection: the column of each image's objects, with 'bbox' and 'category' lists as in "
                          "HF's object-detection guide (default: 'objects')."},
    )
    bbox_format: str = field(
        default="coco",
        metadata={"help": "object-detection: boxes in pixels, coco = [x_min, y_min, width, height], pascal_voc = "
                          "[x_min, y_min, x_max, y_max].", "choices": list(BBOX_FORMATS)},
    )
    mask_column: str | None = field(
        default=None,
        metadata={"help": "semantic-segmentation: the column of masks, an image of one class id per pixel (default: the "
                          "Image column that is not the image: 'annotation', 'label', 'mask', ...)."},
    )
    ignore_index: int = field(
        default=255, metadata={"help": "semantic-segmentation: the mask value of pixels left out of loss and mIoU."}
    )
    label_names: list[str] | None = field(
        default=None,
        metadata={"help": "Class names in id order, when the dataset has no ClassLabel feature for them (else the names "
                          "are '0', '1', ... up to the largest id in the training annotations)."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Side of the square training and evaluation images (default: the encoder's)."}
    )
    out_indices: list[int] | None = field(
        default=None,
        metadata={"help": "Backbone stages the head reads (default: the last for DETR; a ResNet's layer1-layer4 for "
                          "UperNet; an index beyond the stages lists the valid ones)."},
    )
    head_config: str | None = field(
        default=None,
        metadata={"help": 'JSON of DetrConfig or UperNetConfig settings, e.g. \'{"num_queries": 20, "d_model": 128, '
                          '"encoder_layers": 2}\' or \'{"hidden_size": 128}\'.'},
    )
    eval_split: str | None = shared_field(SupervisedDataArguments, "eval_split")
    max_eval_samples: int | None = shared_field(SupervisedDataArguments, "max_eval_samples")
    per_device_eval_batch_size: int = shared_field(SupervisedDataArguments, "per_device_eval_batch_size", default=32)
    min_crop_scale: float = shared_field(
        SupervisedDataArguments, "min_crop_scale", default=0.5,
        help="Smallest area fraction of the random crops of training images (1: no cropping); boxes and masks are "
             "cropped with the image.",
    )

    def __post_init__(self):
        if self.task is None:
            raise ValueError(f"--task is required: one of {', '.join(DENSE_TASKS)}.")
        if self.task not in DENSE_TASKS:
            raise ValueError(f"--task must be one of {', '.join(DENSE_TASKS)}, got {self.task!r}.")
        if self.bbox_format not in BBOX_FORMATS:
            raise ValueError(f"--bbox_format must be one of {', '.join(BBOX_FORMATS)}, got {self.bbox_format!r}.")
        _positive("image_size", self.image_size)
        _positive("max_eval_samples", self.max_eval_samples)
        _positive("per_device_eval_batch_size", self.per_device_eval_batch_size)
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"--min_crop_scale must be in (0, 1], got {self.min_crop_scale}.")
        self.head_config_dict()

    def head_config_dict(self) -> dict[str, Any]:
        if not self.head_config:
            return {}
        try:
            value = json.loads(self.head_config) if isinstance(self.head_config, str) else self.head_config
        except json.JSONDecodeError as error:
            raise ValueError(f"--head_config must be a JSON object, e.g. '{{\"num_queries\": 20}}': {error}") from None
        if not isinstance(value, dict):
            raise ValueError(f"--head_config must be a JSON object, got {self.head_config!r}.")
        return value


@dataclass
class DenseFinetuningArguments:
    """Optimisation and outputs (barlow-finetune's options, with defaults for dense heads)."""

    output_dir: str | None = shared_field(FinetuningArguments, "output_dir")
    overwrite_output_dir: bool = shared_field(FinetuningArguments, "overwrite_output_dir")
    num_train_epochs: float = shared_field(FinetuningArguments, "num_train_epochs", default=50)
    per_device_train_batch_size: int = shared_field(FinetuningArguments, "per_device_train_batch_size", default=16)
    learning_rate: float = shared_field(FinetuningArguments, "learning_rate", default=1e-5)
    head_learning_rate: float = shared_field(
        FinetuningArguments, "head_learning_rate", default=1e-4,
        help="Learning rate of everything but the backbone (DETR's transformer and heads; UperNet's pyramid and head).",
    )
    optimizer: str = shared_field(FinetuningArguments, "optimizer", default="adamw")
    weight_decay: float = shared_field(FinetuningArguments, "weight_decay", default=1e-4)
    warmup_epochs: float = shared_field(FinetuningArguments, "warmup_epochs")
    max_grad_norm: float | None = field(
        default=0.1, metadata={"help": "Clip the gradients' global norm to this (DETR's 0.1); 0 or none: no clipping."}
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "Train only the head; the encoder stays as pretrained (BatchNorm in eval mode)."}
    )
    seed: int = shared_field(FinetuningArguments, "seed")
    mixed_precision: str = shared_field(FinetuningArguments, "mixed_precision")
    logging_steps: int = shared_field(FinetuningArguments, "logging_steps")
    report_to: str = shared_field(FinetuningArguments, "report_to")

    def __post_init__(self):
        check_finetuning_options(self)
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError("--max_grad_norm must be >= 0.")
