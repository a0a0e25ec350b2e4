"""Options of the classifier CLIs, barlow-eval and barlow-finetune, defined once.

Options they share with barlow-pretrain reuse its field definitions through
`training.arguments.shared_field` (same help and choices; a CLI may change the default). Parsing is `barlow_cli.parse_arguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arguments import OutputArguments, PretrainingArguments, _check_min_crop_scale, _positive, shared_field

__all__ = [
    "EVALUATION_PROTOCOLS",
    "LINEAR_SOLVERS",
    "EvaluationArguments",
    "FinetuningArguments",
    "PretrainedModelArguments",
    "SupervisedDataArguments",
]


@dataclass
class PretrainedModelArguments:
    """The model that barlow-eval evaluates and barlow-finetune fine-tunes."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A barlow-pretrain output folder, a saved encoder or classifier folder (Barlow Twins, or any "
                          "image model that transformers' Auto classes load), or a hub id (required)."},
    )
    random_init: bool = field(
        default=False,
        metadata={"help": "Use the architecture of --model_name_or_path with fresh random weights (seeded by --seed): "
                          "the baseline that shows what pretraining adds."},
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required.")


@dataclass
class SupervisedDataArguments:
    """Labels, the held-out split and the training crops, on top of DataArguments."""

    label_column: str | None = field(
        default=None, metadata={"help": "Column holding the class labels; found from the ClassLabel feature when not given."}
    )
    eval_split: str | None = field(
        default=None, metadata={"help": "The split to evaluate on; by default 'validation', else 'test'."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many examples."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per process per evaluation batch."})
    min_crop_scale: float = shared_field(PretrainingArguments, "min_crop_scale")

    def __post_init__(self):
        _positive("max_eval_samples", self.max_eval_samples)
        _positive("per_device_eval_batch_size", self.per_device_eval_batch_size)
        _check_min_crop_scale(self.min_crop_scale)


EVALUATION_PROTOCOLS = ("linear", "knn", "semi")
LINEAR_SOLVERS = ("sgd", "lbfgs")


@dataclass
class EvaluationArguments:
    """barlow-eval: which protocols, and their settings (defaults: the paper's)."""

    output_dir: str | None = shared_field(
        OutputArguments, "output_dir",
        help="Where eval_results.json is written (required). A folder with an earlier eval_results.json is refused "
             "unless --overwrite_output_dir.",
    )
    overwrite_output_dir: bool = shared_field(
        OutputArguments, "overwrite_output_dir", help="Replace the eval_results.json of an earlier evaluation."
    )
    protocol: list[str] = field(
        default_factory=lambda: ["linear", "knn"],
        metadata={"help": "Protocols to run, one or several.", "choices": list(EVALUATION_PROTOCOLS)},
    )
    linear_solver: str = field(
        default="sgd",
        metadata={"help": "sgd: the paper's protocol (SGD, momentum 0.9, cosine schedule, head N(0, 0.01)); lbfgs: "
                          "exact multinomial logistic regression on standardised features (scikit-learn).",
                  "choices": list(LINEAR_SOLVERS)},
    )
    linear_augment: bool = field(
        default=False,
        metadata={"help": "Linear protocol with training augmentations: random resized crops and flips of the training "
                          "images through the frozen backbone at every epoch (no feature cache; sgd only)."},
    )
    linear_epochs: int = field(default=100, metadata={"help": "Epochs of the sgd linear classifier."})
    linear_learning_rate: float = field(default=0.3, metadata={"help": "Learning rate of the sgd linear classifier."})
    linear_weight_decay: float = field(default=1e-6, metadata={"help": "Weight decay of the sgd linear classifier."})
    per_device_train_batch_size: int = shared_field(PretrainingArguments, "per_device_train_batch_size")
    knn_k: int = shared_field(OutputArguments, "knn_k")
    knn_temperature: float = shared_field(OutputArguments, "knn_temperature")
    label_fraction: list[float] = field(
        default_factory=lambda: [0.01, 0.1],
        metadata={"help": "Semi-supervised: fractions of the training labels kept (class-balanced, chosen with --seed)."},
    )
    semi_epochs: int = field(default=20, metadata={"help": "Semi-supervised: fine-tuning epochs."})
    semi_backbone_learning_rate: float = field(
        default=0.005, metadata={"help": "Semi-supervised: learning rate of the backbone (paper: 0.002 to 0.005)."}
    )
    semi_head_learning_rate: float = field(default=0.5, metadata={"help": "Semi-supervised: learning rate of the head."})
    semi_weight_decay: float = field(default=0.0, metadata={"help": "Semi-supervised: weight decay."})
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where features are cached, keyed by model and data (default: $HF_HOME/barlow_twins/features)."},
    )
    cache_features: bool = field(
        default=True, metadata={"help": "Reuse cached features (--no_cache_features recomputes and stores nothing)."}
    )
    seed: int = shared_field(PretrainingArguments, "seed")
    seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "Repeat every probe once per seed (e.g. 0 1 2; default: --seed alone) and report each metric's "
                          "mean, sample standard deviation and minimum over them (linear_top1_mean, _std, _min; "
                          "linear_top1 is then the mean). The features and a --random_init model come from the first."},
    )
    mixed_precision: str = shared_field(PretrainingArguments, "mixed_precision")

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must differ from each other, got {self.seeds}.")
        self.protocol = list(dict.fromkeys(self.protocol))  # in order, once each
        unknown = [p for p in self.protocol if p not in EVALUATION_PROTOCOLS]
        if unknown or not self.protocol:
            raise ValueError(f"--protocol takes {', '.join(EVALUATION_PROTOCOLS)}; got {self.protocol}.")
        if self.linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"--linear_solver must be one of {', '.join(LINEAR_SOLVERS)}, got {self.linear_solver!r}.")
        if self.linear_augment and self.linear_solver != "sgd":
            raise ValueError("--linear_augment trains with SGD: use it with --linear_solver sgd.")
        for name in ("linear_epochs", "per_device_train_batch_size", "knn_k", "semi_epochs"):
            _positive(name, getattr(self, name))
        if self.knn_temperature <= 0:
            raise ValueError("--knn_temperature must be > 0.")
        if min(self.linear_learning_rate, self.linear_weight_decay, self.semi_backbone_learning_rate,
               self.semi_head_learning_rate, self.semi_weight_decay) < 0:
            raise ValueError("Learning rates and weight decays must be >= 0.")
        self.label_fraction = [float(f) for f in self.label_fraction]
        if not self.label_fraction or any(not 0 < f <= 1 for f in self.label_fraction):
            raise ValueError(f"--label_fraction values must be in (0, 1], e.g. 0.01 0.1; got {self.label_fraction}.")


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
