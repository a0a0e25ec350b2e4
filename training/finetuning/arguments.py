"""barlow-finetune's own options: optimisation and outputs, and the checks that classification,
detection and segmentation share.

Options it shares with barlow-pretrain reuse their field definitions through
`training.arguments.shared_field` (same help and choices; a CLI may change the default). Parsing is `barlow_cli.parse_arguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arguments import OutputArguments, PretrainingArguments, _positive, shared_field

__all__ = ["FinetuningArguments", "check_finetuning_options"]


def check_finetuning_options(args) -> None:
    """The checks every fine-tuning command's optimisation options share (classification, detection
    and segmentation): an output folder, positive sizes, non-negative rates."""
    if not args.output_dir:
        raise ValueError("--output_dir is required.")
    _positive("per_device_train_batch_size", args.per_device_train_batch_size)
    _positive("logging_steps", args.logging_steps)
    if args.num_train_epochs <= 0:
        raise ValueError("--num_train_epochs must be > 0.")
    if min(args.learning_rate, args.head_learning_rate, args.weight_decay, args.warmup_epochs) < 0:
        raise ValueError("Learning rates, --weight_decay and --warmup_epochs must be >= 0.")


@dataclass
class FinetuningArguments:
    """barlow-finetune: optimisation and outputs. Defaults: the paper's fine-tuning (SGD, momentum
    0.9, cosine schedule, backbone 0.005 and head 0.5, no weight decay, batch 256, 20 epochs)."""

    output_dir: str | None = shared_field(
        OutputArguments, "output_dir",
        help="Where the classifier, its image processor and metrics are written (required). A folder that holds an "
             "earlier run is refused unless --overwrite_output_dir.",
    )
    overwrite_output_dir: bool = shared_field(
        OutputArguments, "overwrite_output_dir",
        help="Start afresh in an --output_dir that holds an earlier run: its model and logs are removed first "
             "(other files are kept).",
    )
    task: str = field(
        default="image-classification",
        metadata={"help": "image-classification, or object-detection / semantic-segmentation (DETR / UperNet on the "
                          "encoder; `barlow-finetune --task object-detection --help` lists their options).",
                  "choices": ["image-classification", "object-detection", "semantic-segmentation"]},
    )
    num_train_epochs: float = shared_field(PretrainingArguments, "num_train_epochs", default=20)
    per_device_train_batch_size: int = shared_field(PretrainingArguments, "per_device_train_batch_size")
    learning_rate: float = field(default=0.005, metadata={"help": "Learning rate of the backbone."})
    head_learning_rate: float = field(default=0.5, metadata={"help": "Learning rate of the classification head."})
    optimizer: str = field(
        default="sgd", metadata={"help": "sgd (momentum 0.9) or adamw.", "choices": ["sgd", "adamw"]}
    )
    weight_decay: float = shared_field(PretrainingArguments, "weight_decay", default=0.0)
    warmup_epochs: float = shared_field(
        PretrainingArguments, "warmup_epochs", default=0.0,
        help="Linear warm-up length in epochs, before the cosine schedule. None by default: the paper's fine-tuning "
             "has none (its 10 warm-up epochs are pretraining's).",
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "Train only the head, the backbone frozen in eval mode: the linear protocol with training "
                          "augmentations, saved as a classifier."},
    )
    seed: int = shared_field(PretrainingArguments, "seed")
    mixed_precision: str = shared_field(PretrainingArguments, "mixed_precision")
    logging_steps: int = shared_field(OutputArguments, "logging_steps")
    report_to: str = shared_field(OutputArguments, "report_to")

    def __post_init__(self):
        check_finetuning_options(self)
