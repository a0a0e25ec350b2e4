"""Model cards for published Barlow Twins models.

The card (`README.md`) is rendered from the top-level `model_card.md` template (shipped in the `hub` package of
a wheel) with huggingface_hub's
`ModelCard.from_template`, so its YAML header (library, pipeline tag, tags, datasets, license,
base model, `model-index`) is written by the hub's own serialiser. The body takes the training
hyperparameters from the run's `training_args.json` and the results from a `barlow-eval` metrics
JSON.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from barlow_cli import UsageError

from .timm_format import timm_incompatibility


__all__ = [
    "EVAL_PROTOCOLS",
    "create_model_card",
    "default_template_path",
    "eval_results_from_metrics",
    "read_eval_metrics",
    "read_training_args",
]

logger = logging.getLogger(__name__)

# barlow-eval's metric keys: `<protocol>_top1` / `<protocol>_top5`, fractions in [0, 1].
EVAL_PROTOCOLS = {
    "linear": "Linear probe",
    "knn": "kNN",
    "semi_1pct": "Fine-tuned on 1% of the labels",
    "semi_10pct": "Fine-tuned on 10% of the labels",
    "finetune": "Fine-tuned on all labels",
}
_METRIC = re.compile(r"^(?P<protocol>.+)_(?P<k>top1|top5)$")
# barlow-eval --seeds adds `<metric>_mean`, `_std` and `_min` over seeds (and `<metric>` is the mean).
_SUMMARY = re.compile(r"^(?P<metric>.+_(?:top1|top5))_(?P<stat>mean|std|min)$")
# Keys of a metrics file that name the evaluation data rather than hold a result.
_DATASET_KEYS = ("dataset_name", "dataset", "eval_dataset")

# Hyperparameters shown in the card, in this order, from training_args.json (then metrics.json).
_TRAINING_ROWS = (
    ("backbone", "backbone"),
    ("backbone_kwargs", "backbone arguments"),
    ("small_image_stem", "small-image stem"),
    ("projector_dims", "projector widths"),
    ("off_diagonal_weight", "off-diagonal weight (lambda)"),
    ("loss_scale", "loss scale"),
    ("image_size", "image size (px)"),
    ("optimizer", "optimizer"),
    ("learning_rate_weights", "learning rate, weights (per 256 images)"),
    ("learning_rate_biases", "learning rate, biases and norms (per 256 images)"),
    ("weight_decay", "weight decay"),
    ("warmup_epochs", "warm-up epochs"),
    ("warmup_steps", "warm-up steps"),
    ("num_train_epochs", "epochs"),
    ("max_train_steps", "optimizer steps (limit)"),
    ("global_batch_size", "global batch size"),
    ("per_device_train_batch_size", "batch size per device"),
    ("num_processes", "processes"),
    ("gradient_accumulation_steps", "gradient accumulation steps"),
    ("mixed_precision", "mixed precision"),
    ("augment_on_device", "augmentation on the accelerator"),
    ("seed", "seed"),
)
_RUN_ROWS = (
    ("global_step", "optimizer steps run"),
    ("epochs", "epochs run"),
    ("train_loss", "final training loss"),
    ("wall_time_s", "training time (s)"),
)
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


def default_template_path() -> Path:
    """`model_card.md`, the template: the copy a wheel ships inside the `hub` package (setup.py puts it
    there), else the checkout's top-level file, which an editable install or the source tree reads."""
    shipped = Path(str(files("hub").joinpath("model_card.md")))
    return shipped if shipped.is_file() else Path(__file__).resolve().parent.parent / "model_card.md"


def read_eval_metrics(path: str | Path) -> dict[str, Any]:
    """Read a `barlow-eval` metrics JSON. Raises `UsageError` (a `ValueError`) for a file that is not a JSON object,
    or whose `*_top1` / `*_top5` values are not fractions in [0, 1]."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--eval_results {file}: no such file.")
    try:
        metrics = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--eval_results {file} is not valid JSON: {error}") from None
    if isinstance(metrics, dict) and isinstance(metrics.get("metrics"), dict):
        metrics = {**{k: v for k, v in metrics.items() if k != "metrics"}, **metrics["metrics"]}
    if not isinstance(metrics, dict):
        raise UsageError(f'--eval_results {file} must hold a JSON object such as {{"linear_top1": 0.73}}.')
    _check_metric_values(metrics, str(file))
    if not any(_METRIC.match(key) for key in metrics):
        logger.warning(f"{file} has no *_top1 or *_top5 results (expected keys like linear_top1, knn_top1).")
    return metrics


def _check_metric_values(metrics: dict[str, Any], source: str) -> None:
    for key, value in metrics.items():
        if not (_METRIC.match(key) or _SUMMARY.match(key)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{source}: {key} must be a number, got {value!r}.")
        if not 0 <= value <= 1:
            raise ValueError(f"{source}: {key} = {value} is not a fraction in [0, 1] (barlow-eval writes fractions).")


def _dataset_of(metrics: dict[str, Any], dataset_name: str | None) -> str | None:
    for key in _DATASET_KEYS:
        if isinstance(metrics.get(key), str) and metrics[key]:
            return metrics[key]
    return dataset_name


def _protocol_label(protocol: str) -> str:
    return EVAL_PROTOCOLS.get(protocol, protocol.replace("_", " ").capitalize())


def eval_results_from_metrics(metrics: dict[str, Any], dataset_name: str | None = None) -> list[EvalResult]:
    """One `EvalResult` (image classification accuracy) per `<protocol>_top1` / `_top5` key.

    Missing keys are simply absent from the results. The dataset is the metrics' own
    `dataset_name` (or `dataset`) when present, else `dataset_name`, else "unspecified".
    """
    _check_metric_values(metrics, "metrics")
    dataset = _dataset_of(metrics, dataset_name)
    if dataset is None:
        logger.warning("The evaluation dataset is unknown: give --dataset_name (written as 'unspecified' in the card).")
    split = metrics.get("split") if isinstance(metrics.get("split"), str) else None
    results = []
    for key, value in metrics.items():
        match = _METRIC.match(key)
        if not match:
            continue
        label = _protocol_label(match["protocol"])
        k = match["k"].replace("top", "top-")
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image classification",
                dataset_type=dataset or "unspecified",
                dataset_name=dataset or "unspecified",
                dataset_split=split,
                metric_type="accuracy",
                metric_name=f"{label} {k} accuracy",
                metric_value=float(value),
            )
        )
    return results


def _eval_rows(metrics: dict[str, Any], dataset_name: str | None) -> list[dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    dataset = _dataset_of(metrics, dataset_name) or "unspecified"
    for key, value in metrics.items():
        match = _METRIC.match(key)
        if match:
            empty = {"protocol": _protocol_label(match["protocol"]), "dataset": dataset, "top1": "-", "top5": "-"}
            row = rows.setdefault(match["protocol"], empty)
            row[match["k"]] = _percent_cell(metrics, key)
    return list(rows.values())


def _percent_cell(metrics: dict[str, Any], key: str) -> str:
    """A metric in percent; over seeds, mean ± sample standard deviation (minimum)."""
    if f"{key}_std" not in metrics:
        return f"{100 * float(metrics[key]):.1f}"
    mean, std = metrics.get(f"{key}_mean", metrics[key]), metrics[f"{key}_std"]
    cell = f"{100 * float(mean):.1f} ± {100 * float(std):.1f}"
    return cell + (f" (min {100 * float(metrics[f'{key}_min']):.1f})" if f"{key}_min" in metrics else "")


def _eval_intro(metrics: dict[str, Any]) -> str:
    intro = "Accuracy of classifiers on the frozen or fine-tuned features (`barlow-eval`)"
    seeds = metrics.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1 and any(_SUMMARY.match(key) for key in metrics):
        intro += (f", mean ± sample standard deviation over {len(seeds)} evaluation seeds "
                  f"({', '.join(map(str, seeds))}), their minimum in brackets")
    return intro + ":"


def read_training_args(model_dir: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`training_args.json` and `metrics.json` of a training run's output folder (None when
    absent or unreadable: a card can be written without them)."""
    found = []
    for name in ("training_args.json", "metrics.json"):
        file = Path(model_dir) / name
        try:
            value = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning(f"{file} is not valid JSON; the card leaves it out.")
            value = None
        found.append(value if isinstance(value, dict) else None)
    return found[0], found[1]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _training_rows(training_args: dict[str, Any] | None, run_metrics: dict[str, Any] | None) -> list[tuple[str, str]]:
    # A run limited by its steps did not train for its (default) epochs: those would mislead.
    skipped = {"num_train_epochs"} if (training_args or {}).get("max_train_steps") else set()
    if (training_args or {}).get("warmup_steps") is not None:
        skipped.add("warmup_epochs")
    rows = []
    for source, names in ((training_args, _TRAINING_ROWS), (run_metrics, _RUN_ROWS)):
        for key, label in names:
            if source and key not in skipped and source.get(key) not in (None, ""):
                rows.append((label, _cell(source[key])))
    return rows


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) is not None and not Path(name).exists()


def _dataset_label(training_args: dict[str, Any] | None, dataset_name: str | None) -> str | None:
    if dataset_name:
        return dataset_name
    if not training_args:
        return None
    name, folder = training_args.get("dataset_name"), training_args.get("train_dir")
    if "dataset_name" in training_args and not name and not folder:
        return "scikit-learn's handwritten digits (the trainer's offline default)"
    local = training_args.get("dataset_is_local")
    if local is None:  # a run recorded before the trainer said where its data came from
        local = not _is_hub_id(name)
    if folder or local:
        return "a local image collection"  # never publish local paths
    return name


@dataclass
class _Layout:
    encoder_format: str | None
    pretraining_subfolder: str | None

    def describe(self) -> str:
        parts = []
        if self.encoder_format == "timm":
            parts.append(
                "the encoder in timm's format at the root (`config.json`, `model.safetensors`; no custom code)"
            )
        elif self.encoder_format == "transformers":
            parts.append(
                "the encoder in this project's transformers classes at the root, with their code files (`trust_remote_code=True`)"
            )
        if self.pretraining_subfolder == "":
            parts.append(
                "encoder and projector (`BarlowTwinsForPreTraining`) at the root, with their code files (`trust_remote_code=True`)"
            )
        elif self.pretraining_subfolder:
            parts.append(
                f"encoder and projector (`BarlowTwinsForPreTraining`) in `{self.pretraining_subfolder}/`, for continuing "
                f"pretraining (`trust_remote_code=True`)"
            )
        return "; ".join(parts) + "."


def create_model_card(
    config: Any,
    *,
    encoder_format: Literal["timm", "transformers"] | None,
    pretraining_subfolder: str | None = None,
    repo_id: str | None = None,
    local_dir: str | Path | None = None,
    eval_metrics: dict[str, Any] | None = None,
    training_args: dict[str, Any] | None = None,
    run_metrics: dict[str, Any] | None = None,
    dataset_name: str | None = None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    training_source: str | None = None,
    notes: list[str] | None = None,
    label_names: list[str] | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Render the model card of an exported repository.

    Args:
        config: the model's `BarlowTwinsConfig`.
        encoder_format: what the root holds: `"timm"`, `"transformers"` (our encoder classes), or
            None when the root is the full pretraining model.
        pretraining_subfolder: where the full model is ("" for the root), None when absent.
        repo_id: the hub id the usage snippets load; without it they load `local_dir`.
        eval_metrics: a `barlow-eval` metrics dict (see `read_eval_metrics`).
        training_args, run_metrics: the run's `training_args.json` and `metrics.json`.
        dataset_name: the hub dataset the model was trained on (metadata `datasets`).
        license: an SPDX-like hub license id, e.g. "apache-2.0", "mit", "cc-by-nc-4.0".
        base_model: the hub model this one was initialised from, if any.
        training_source: replaces the sentence introducing the training table.
        notes, label_names: extra bullet points; the classifier's labels, if it has a head.
        template_path: defaults to `model_card.md` (see `default_template_path`).
    """
    if not repo_id and local_dir is None:
        raise ValueError("create_model_card needs repo_id or local_dir: the usage snippets must name what to load.")
    if not isinstance(license, str) or not _LICENSE.match(license):
        raise ValueError(f"license must be a hub license id such as 'apache-2.0' or 'mit', got {license!r}.")
    repo_ref = repo_id or str(Path(local_dir).resolve())
    model_name = (repo_id or Path(repo_ref).name).split("/")[-1]
    dataset_label = _dataset_label(training_args, dataset_name)
    hub_dataset = dataset_name or (dataset_label if _is_hub_id(dataset_label) else None)
    eval_results = eval_results_from_metrics(eval_metrics, hub_dataset) if eval_metrics else None
    library = "timm" if encoder_format == "timm" else "transformers"
    pipeline_tag = "image-classification" if label_names else "image-feature-extraction"
    tags = ["barlow-twins", "self-supervised", "image-feature-extraction", "pytorch", config.backbone]
    tags += ["timm"] if library == "timm" else ["custom_code"]
    datasets = [hub_dataset] if hub_dataset else None
    card_data = ModelCardData(
        library_name=library,
        pipeline_tag=pipeline_tag,
        tags=tags,
        datasets=datasets,
        license=license,
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
        metrics=["accuracy"] if eval_results else None,
    )
    data = dataset_label or "images whose source was not recorded"
    if training_source is None and not training_args:
        training_source = "The training run's arguments were not recorded with this model."
    elif training_source is None and label_names:
        training_source = f"A Barlow Twins encoder fine-tuned with labels on {data}. The run's arguments:"
    elif training_source is None:
        training_source = (
            f"Pretrained with Barlow Twins (`barlow-pretrain`) on {data}, without labels. The run's arguments:"
        )
    num_features, pooling = _encoder_features(config)
    summary = (
        f"A {config.backbone} image encoder pretrained with Barlow Twins, a self-supervised method: it turns an image "
        f"into a {num_features}-dimensional feature vector for retrieval, linear probing or fine-tuning."
    )
    if label_names:
        summary += f" It carries a classifier fine-tuned on {len(label_names)} classes."
    timm_ref = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{repo_ref}"
    resize = int(config.image_size / config.crop_pct)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or default_template_path()),
        model_name=model_name,
        summary=summary,
        architecture=config.backbone,
        backbone_kwargs=json.dumps(config.backbone_kwargs) if config.backbone_kwargs else "",
        small_image_stem=config.small_image_stem,
        num_features=num_features,
        pooling=pooling,
        num_channels=config.num_channels,
        image_size=config.image_size,
        resize_size=resize,
        interpolation=config.interpolation,
        image_mean=[round(v, 4) for v in config.image_mean],
        image_std=[round(v, 4) for v in config.image_std],
        image_mode="L" if config.num_channels == 1 else "RGB",
        projector_dims="-".join(map(str, config.projector_dims)) if pretraining_subfolder is not None else "",
        layout=_Layout(encoder_format, pretraining_subfolder).describe(),
        notes=notes or [],
        training_source=training_source,
        training_rows=_training_rows(training_args, run_metrics),
        eval_intro=_eval_intro(eval_metrics or {}),
        eval_rows=_eval_rows(eval_metrics, hub_dataset) if eval_metrics else [],
        encoder_format=encoder_format,
        timm_reason=timm_incompatibility(config) or "timm rebuilds a different network from its config",
        timm_ref=timm_ref,
        repo_ref=repo_ref,
        remote_code="" if encoder_format == "timm" else ", trust_remote_code=True",
        pretraining_subfolder=pretraining_subfolder,
        subfolder_arg=f', subfolder="{pretraining_subfolder}"' if pretraining_subfolder else "",
        label_names=label_names or [],
        dataset_label=dataset_label,
    )


# timm's global_pool names for token sequences (ViT, DeiT, EVA, ...): what the pooled features are.
_TOKEN_POOLING = {
    "token": "the class token",
    "avg": "the mean of the patch tokens",
    "avgmax": "the mean and maximum of the patch tokens",
    "max": "the maximum of the patch tokens",
    "map": "attention pooling of the tokens",
}


def _encoder_features(config: Any) -> tuple[int, str]:
    """(width of the pooled features, how timm pools them: "" for CNNs' spatial pooling)."""
    # Built on the meta device: the width and pooling are all that is needed, not weights or memory.
    with torch.device("meta"):
        network = timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.backbone_kwargs)
    pool = getattr(network, "global_pool", None)
    return network.num_features, _TOKEN_POOLING.get(pool, "") if isinstance(pool, str) else ""
