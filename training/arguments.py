"""barlow-pretrain's options (shared by the other CLIs where they mean the same), the options of
the model and labelled data that barlow-eval, barlow-finetune and barlow-embed share, and the parser.

barlow-eval's and barlow-finetune's own options are in `evaluation/arguments.py` and
`finetuning/arguments.py`, which reuse these field definitions.

Each CLI parses a tuple of these dataclasses (plus its own) with transformers' `HfArgumentParser`.
`--config FILE` (YAML or JSON) supplies values first; options given on the command line win.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from modeling_barlow import BarlowTwinsConfig

from .shared.augment.params import ViewAugmentationParams, barlow_twins_view_params
from .shared.distributed import DDP_COMM_HOOKS


__all__ = [
    "DataArguments",
    "HubArguments",
    "ModelArguments",
    "OutputArguments",
    "PretrainedModelArguments",
    "PretrainingArguments",
    "SupervisedDataArguments",
    "parse_projector_dims",
    "shared_field",
]


def shared_field(owner: type, name: str, **changes: Any) -> Any:
    """The dataclass field `name` of `owner`, again for another CLI: its help and choices, and its
    default unless `default=` (or `help=`) is given."""
    original = owner.__dataclass_fields__[name]
    metadata = dict(original.metadata)
    if "help" in changes:
        metadata["help"] = changes.pop("help")
    if "default" in changes:
        return field(default=changes.pop("default"), metadata=metadata)
    if original.default_factory is not MISSING:
        return field(default_factory=original.default_factory, metadata=metadata)
    return field(default=original.default, metadata=metadata)


@dataclass
class DataArguments:
    """Where the images come from. With no data option, scikit-learn's digits are used."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A hub dataset id, or a local folder (imagefolder, parquet, webdataset, or save_to_disk)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "The split to train on."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder directory (one subfolder per class)."})
    image_column: str | None = field(
        default=None, metadata={"help": "Column holding the images; found from the Image feature when not given."}
    )
    streaming: bool = field(
        default=True, metadata={"help": "Stream the dataset instead of loading it (use --no_streaming to load it)."}
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Examples in the streaming shuffle buffer."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (for debugging or quick runs)."}
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes decoding and augmenting images (0: the main one)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches downloaded data."})

    def __post_init__(self):
        if self.dataset_name and self.train_dir:
            raise ValueError("Give either --dataset_name or --train_dir, not both.")
        _positive("shuffle_buffer_size", self.shuffle_buffer_size)
        _positive("max_train_samples", self.max_train_samples)
        if self.dataloader_num_workers < 0:
            raise ValueError("--dataloader_num_workers must be >= 0.")


def parse_projector_dims(value: str | int | list[str | int]) -> list[int]:
    """The projector widths from the command line or a --config file: one width per item
    ("8192 8192 8192", or a list), items joined by dashes ("8192-8192-8192", the authors' --projector),
    or both. ValueError (a usage error) for anything else."""
    items = [value] if isinstance(value, (str, int)) else list(value)
    widths = []
    for item in items:
        for part in str(item).split("-"):
            if not part.strip().isdecimal():
                raise ValueError(
                    f"--projector_dims takes widths as '8192 8192 8192' or '8192-8192-8192', got {item!r}."
                )
            widths.append(int(part))
    return widths


def _config_default(name: str) -> Any:
    """BarlowTwinsConfig's default for `name`: the options and the config share one source."""
    config_field = next(f for f in fields(BarlowTwinsConfig) if f.name == name)
    return config_field.default_factory() if config_field.default_factory is not MISSING else config_field.default


@dataclass
class ModelArguments:
    """The network: a timm backbone and the projector (BarlowTwinsConfig's defaults and checks), or a
    saved model to continue from."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved BarlowTwinsForPreTraining (folder or hub id)."}
    )
    backbone: str = field(default=_config_default("backbone"), metadata={"help": "Any timm model name."})
    backbone_kwargs: str | None = field(
        default=None, metadata={"help": 'JSON passed to timm.create_model, e.g. \'{"drop_path_rate": 0.1}\'.'}
    )
    small_image_stem: bool = field(
        default=_config_default("small_image_stem"),
        metadata={"help": "ResNet only: 3x3 stride-1 first convolution and no max-pool (32 px images)."},
    )
    # Read as strings so that the authors' spelling passes argparse; __post_init__ makes them ints.
    projector_dims: list[str] = field(
        default_factory=lambda: _config_default("projector_dims"),
        metadata={"help": "Widths of the projector's linear layers, the last being the embedding width D: "
                          "'8192 8192 8192' or, as the authors' --projector, '8192-8192-8192'."},
    )
    off_diagonal_weight: float = field(
        default=_config_default("off_diagonal_weight"), metadata={"help": "The paper's lambda."}
    )
    loss_scale: float = field(default=_config_default("loss_scale"), metadata={"help": "Multiplies the whole loss."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Training resolution; defaults to the backbone's input size. Vision Transformers (ViT, "
                          "DeiT, Swin, ...) are built for it; it must be a multiple of their patch size."},
    )

    def __post_init__(self):
        self.projector_dims = parse_projector_dims(self.projector_dims)
        self.to_config()  # BarlowTwinsConfig's checks, raised as usage errors before anything runs

    def to_config(self) -> BarlowTwinsConfig:
        """The configuration these options describe."""
        return BarlowTwinsConfig(
            backbone=self.backbone,
            backbone_kwargs=self.backbone_kwargs_dict(),
            small_image_stem=self.small_image_stem,
            projector_dims=self.projector_dims,
            off_diagonal_weight=self.off_diagonal_weight,
            loss_scale=self.loss_scale,
            image_size=self.image_size,
        )

    def backbone_kwargs_dict(self) -> dict[str, Any]:
        if not self.backbone_kwargs:
            return {}
        try:
            value = json.loads(self.backbone_kwargs) if isinstance(self.backbone_kwargs, str) else self.backbone_kwargs
        except json.JSONDecodeError as error:
            raise ValueError(f"--backbone_kwargs must be a JSON object, e.g. '{{\"in_chans\": 1}}': {error}") from None
        if not isinstance(value, dict):
            raise ValueError(f"--backbone_kwargs must be a JSON object, got {self.backbone_kwargs!r}.")
        return value


@dataclass
class PretrainingArguments:
    """Optimisation and the training loop."""

    per_device_train_batch_size: int = field(
        default=256, metadata={"help": "Images per process per step (at least 2: the loss standardises over the batch)."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step (each micro-batch has its own C)."}
    )
    num_train_epochs: float = field(default=100, metadata={"help": "Passes over the training data."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Total optimizer steps; overrides --num_train_epochs when given."}
    )
    optimizer: str = field(default="lars", metadata={"help": "lars, sgd or adamw.", "choices": ["lars", "sgd", "adamw"]})
    learning_rate_weights: float = field(
        default=0.2, metadata={"help": "Learning rate of the weights per 256 images of global batch."}
    )
    learning_rate_biases: float = field(
        default=0.0048, metadata={"help": "Learning rate of biases and norm parameters per 256 images of global batch."}
    )
    weight_decay: float = field(default=1.5e-6, metadata={"help": "Weight decay (not applied to 1-d parameters)."})
    lars_trust_coefficient: float = field(
        default=0.001,
        metadata={"help": "LARS trust coefficient eta: a weight's step is lr x eta x ||w|| / ||g|| "
                          "(the paper's 0.001)."},
    )
    lars_trust_clip: bool = field(
        default=False,
        metadata={"help": "Cap each weight's LARS step at the learning rate: min(eta x ||w|| / ||g||, lr) instead "
                          "of the product (LARC's clip mode; solo-learn's CIFAR recipes use it with eta 0.02)."},
    )
    warmup_epochs: float | None = field(
        default=None,
        metadata={"help": "Linear warm-up length in epochs. Default: the paper's 10 when the dataset's size is known, "
                          "else 1%% of the steps (10 of the paper's 1000 epochs)."},
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warm-up length as a fraction of all steps; overrides --warmup_epochs."}
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Warm-up length in steps; overrides --warmup_ratio and --warmup_epochs."}
    )
    mixed_precision: str = field(
        default="no", metadata={"help": "no, fp16 or bf16 (the loss stays fp32).", "choices": ["no", "fp16", "bf16"]}
    )
    ddp_comm_hook: str = field(
        default="no",
        metadata={"help": "With several processes: 'bf16' sends the gradients in bfloat16, half the bytes of the "
                          "default fp32 ('no'), each rounded to 8 bits of mantissa (see benchmarks/RESULTS.md for "
                          "its effect on the loss).", "choices": list(DDP_COMM_HOOKS)},
    )
    seed: int = field(default=42, metadata={"help": "Random seed for initialisation, shuffling and augmentation."})
    augment_on_device: bool = field(
        default=False,
        metadata={"help": "Decode and crop on the CPU; colour, blur and solarisation batched on the accelerator."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Keep convolution weights and inputs channels-last (NHWC): faster convolutions on GPUs "
                          "with tensor cores and on CPUs (oneDNN), especially with --mixed_precision bf16 or fp16."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the model with torch.compile (inductor). The first steps are slow while it compiles."},
    )
    activation_memory_budget: float | None = field(
        default=None,
        metadata={"help": "With --torch_compile: the share (0-1] of the activations the compiled backward keeps; it "
                          "recomputes the rest, cheapest first (torch's activation memory budget, a prototype "
                          "setting). Less memory, often at the same speed: see benchmarks/RESULTS.md."},
    )
    # The paper's values are for 224 px ImageNet. On 32 px images a blur leaves little detail, and
    # small-image recipes (solo-learn's and lightly's CIFAR-10 benchmarks) turn it off: `0 0`.
    blur_probability: list[float] = field(
        default_factory=lambda: [1.0, 0.1],
        metadata={"help": "Probability of a Gaussian blur in view 1 and in view 2 (the paper's 1.0 0.1)."},
    )
    solarization_probability: list[float] = field(
        default_factory=lambda: [0.0, 0.2],
        metadata={"help": "Probability of solarisation in view 1 and in view 2 (the paper's 0.0 0.2)."},
    )
    min_crop_scale: float = field(
        default=0.08,
        metadata={"help": "Smallest area fraction of the random resized crops (the paper's 0.08); 1.0 keeps whole "
                          "images. In barlow-pretrain both views; in barlow-eval and barlow-finetune the crops that "
                          "train classifiers."},
    )

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            _positive(name, getattr(self, name))
        if self.per_device_train_batch_size < 2:
            raise ValueError("--per_device_train_batch_size must be at least 2: Barlow Twins standardises each "
                             "embedding dimension over the batch.")
        if self.activation_memory_budget is not None:
            if not self.torch_compile:
                raise ValueError("--activation_memory_budget needs --torch_compile (it shapes the compiled backward).")
            if not 0 < self.activation_memory_budget <= 1:
                raise ValueError(f"--activation_memory_budget must be in (0, 1], got {self.activation_memory_budget}.")
        _check_min_crop_scale(self.min_crop_scale)
        for name in ("blur_probability", "solarization_probability"):
            values = getattr(self, name)
            if len(values) != 2 or not all(0 <= v <= 1 for v in values):
                raise ValueError(f"--{name} takes two probabilities in [0, 1], one per view, got {values}.")
        if self.num_train_epochs <= 0:
            raise ValueError("--num_train_epochs must be > 0.")
        if min(self.learning_rate_weights, self.learning_rate_biases, self.weight_decay, self.warmup_epochs or 0) < 0:
            raise ValueError("Learning rates, --weight_decay and --warmup_epochs must be >= 0.")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1], got {self.warmup_ratio}.")
        if self.lars_trust_coefficient <= 0:
            raise ValueError(f"--lars_trust_coefficient must be > 0, got {self.lars_trust_coefficient}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError("--warmup_steps must be >= 0.")

    def view_params(self) -> tuple[ViewAugmentationParams, ViewAugmentationParams]:
        """The two views' augmentation parameters: the paper's, with these crop scales and blur and
        solarisation odds."""
        return tuple(
            replace(params, crop_scale=(self.min_crop_scale, 1.0), blur_p=blur, solarize_p=solarize)
            for params, blur, solarize in zip(barlow_twins_view_params(), self.blur_probability, self.solarization_probability)
        )


@dataclass
class OutputArguments:
    """Outputs, checkpoints and monitoring."""

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the model, checkpoints, metrics and plots are written (required). A folder that "
                          "holds an earlier run is refused unless --overwrite_output_dir or --resume_from_checkpoint."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an --output_dir that holds an earlier run: its model, checkpoints and logs "
                          "are removed first (other files are kept)."},
    )
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": "Save a checkpoint every N optimizer steps, or 'epoch' at every epoch end."}
    )
    save_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep only the newest N checkpoints; an older one is deleted once a newer one is complete."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to continue from, or 'latest': the newest checkpoint in --output_dir "
                          "that loads (a damaged one is skipped)."},
    )
    report_to: str = field(
        default="none",
        metadata={"help": "Trackers: tensorboard, wandb, all or none.", "choices": ["tensorboard", "wandb", "all", "none"]},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log losses, learning rates and throughput every N steps."})
    knn_eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Labelled dataset for the kNN monitor (hub id or folder with train/test splits; 'default': digits)."},
    )
    knn_eval_steps: int | None = field(default=None, metadata={"help": "Run the kNN monitor every N steps (and at the end)."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours for the kNN monitor (200 for ImageNet-size data)."})
    knn_temperature: float = field(default=0.1, metadata={"help": "Temperature of the kNN votes."})
    rankme_samples: int = field(
        default=256,
        metadata={"help": "Collapse monitor: at every logging step, the RankMe (effective rank, Garrido et al. 2023) "
                          "of the embeddings of this many held-out images, logged as rankme (encoder) and "
                          "rankme_projections. It needs no labels. 0 turns it off."},
    )
    rankme_warning_threshold: float = field(
        default=2.0,
        metadata={"help": "Warn when the encoder's RankMe falls below this, or ends the run below it: 1 means "
                          "every image gets the same embedding direction (complete collapse). A new network may "
                          "start below it. 0 never warns."},
    )

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required.")
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch":
            if not self.checkpointing_steps.isdigit() or int(self.checkpointing_steps) <= 0:
                raise ValueError(f"--checkpointing_steps must be a positive integer or 'epoch', got {self.checkpointing_steps!r}.")
        _positive("logging_steps", self.logging_steps)
        _positive("save_total_limit", self.save_total_limit)
        _positive("knn_eval_steps", self.knn_eval_steps)
        _positive("knn_k", self.knn_k)
        if self.knn_temperature <= 0:
            raise ValueError("--knn_temperature must be > 0.")
        if self.rankme_samples == 1 or self.rankme_samples < 0:
            raise ValueError(f"--rankme_samples must be 0 (off) or at least 2, got {self.rankme_samples}.")
        if not self.rankme_warning_threshold >= 0:
            raise ValueError(f"--rankme_warning_threshold must be >= 0, got {self.rankme_warning_threshold}.")


def _check_min_crop_scale(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"--min_crop_scale must be in (0, 1], got {value}.")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"--{name} must be a positive integer, got {value}.")


@dataclass
class HubArguments:
    """Uploading the result to the Hugging Face Hub when the run ends (through `hub.publish`)."""

    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the saved model (with a model card) to --hub_model_id at the end."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "The repository to push to, <user or org>/<name>."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository as private."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id <user or org>/<name>.")

    def check_token(self) -> None:
        """Fail before training, not after it, when an upload is asked for without a token."""
        from huggingface_hub import get_token

        if self.push_to_hub and not get_token():
            raise ValueError("--push_to_hub needs a token: set HF_TOKEN or run `hf auth login`.")

    def push(self, output_dir: str | Path) -> str | None:
        """Publish `output_dir` with the same code as `barlow-publish` (the card names the dataset
        from the run's training_args.json, never a local path); returns the URL. Only the main
        process of a launch uploads."""
        if not self.push_to_hub or int(os.environ.get("RANK", "0")) != 0:
            return None
        from hub import PublishError, publish

        try:
            result = publish(output_dir, repo_id=self.hub_model_id, push=True, private=self.hub_private_repo)
        except PublishError as error:
            retry = f"barlow-publish --model_dir {output_dir} --repo_id {self.hub_model_id} --push"
            raise ValueError(f"The model is saved in {output_dir}, but the upload failed: {error} Retry with: {retry}") from None
        return result.url

    def push_as_saved(self, output_dir: str | Path) -> str | None:
        """Upload `output_dir` as it was saved, with the upload `push` ends with (`hub.push_folder`):
        for a detection or segmentation model, a DETR or UperNet around the encoder, which
        barlow-publish's encoder formats do not cover. Returns the URL; only the main process uploads."""
        if not self.push_to_hub or int(os.environ.get("RANK", "0")) != 0:
            return None
        from hub import PublishError, push_folder

        try:
            return push_folder(output_dir, self.hub_model_id, private=self.hub_private_repo)
        except PublishError as error:
            retry = f"hf upload {self.hub_model_id} {output_dir}"
            raise ValueError(f"The model is saved in {output_dir}, but the upload failed: {error} Retry with: {retry}") from None


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
