"""barlow-eval's own options: which protocols, and their settings.

Options it shares with barlow-pretrain reuse their field definitions through
`training.arguments.shared_field` (same help and choices; a CLI may change the default). Parsing is `barlow_cli.parse_arguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arguments import OutputArguments, PretrainingArguments, _positive, shared_field

__all__ = ["EVALUATION_PROTOCOLS", "LINEAR_SOLVERS", "EvaluationArguments"]


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
