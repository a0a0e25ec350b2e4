"""Export Barlow Twins models into folders that load elsewhere.

Two layouts:

* **timm hub format** (`export_timm_encoder`): `config.json` (`architecture`, `num_features`,
  `model_args`, `pretrained_cfg`) and `model.safetensors` with timm's own key names. It loads with
  no custom code in `timm.create_model("hf-hub:..." / "local-dir:...", pretrained=True)`, and in
  transformers through `TimmWrapperModel` (`AutoModel`, `AutoModelForImageClassification`, the
  image-feature-extraction pipeline).
* **our classes with their code files** (`export_encoder_with_code`, `export_full_model`): the
  `save_pretrained` folder with `auto_map`, loadable with `trust_remote_code=True`. It is the only
  faithful layout for backbones changed beyond timm's options (the small-image stem), and the
  one that keeps the projector for continuing pretraining.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import timm
import torch
from safetensors import SafetensorError
from torch import nn

from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsModel,
    BarlowTwinsPreTrainedModel,
    create_image_processor,
)


__all__ = [
    "EXPORT_FORMATS",
    "PRETRAINING_SUBFOLDER",
    "ExportResult",
    "TimmExportError",
    "export_encoder",
    "export_encoder_with_code",
    "export_full_model",
    "export_model",
    "export_timm_encoder",
    "load_barlow_model",
    "timm_hub_config",
    "timm_incompatibility",
    "timm_state_dict",
    "verify_timm_export",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("encoder", "full", "both")
# With --format both the repository root is the encoder (what most users load) and the full
# model sits below it; from_pretrained(repo, subfolder=PRETRAINING_SUBFOLDER) reaches it.
PRETRAINING_SUBFOLDER = "pretraining"
PAPER = {
    "paper_ids": "arXiv:2103.03230",
    "paper_name": "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
}

_MODEL_CLASSES: dict[str, type[BarlowTwinsPreTrainedModel]] = {
    cls.__name__: cls for cls in (BarlowTwinsForPreTraining, BarlowTwinsModel, BarlowTwinsForImageClassification)
}


class TimmExportError(ValueError):
    """The model cannot be written as a plain timm repository without changing the network."""


@dataclass
class ExportResult:
    """What `export_model` wrote.

    Attributes:
        folder: the repository folder.
        encoder_format: `"timm"` (no custom code), `"transformers"` (our classes, trust_remote_code),
            or None when only the full model was exported.
        pretraining_subfolder: where the full model is, relative to `folder` ("" for the root),
            or None when it was not exported.
        notes: why the layout differs from the one asked for, if it does.
    """

    folder: Path
    encoder_format: Literal["timm", "transformers"] | None
    pretraining_subfolder: str | None
    notes: list[str] = field(default_factory=list)


def load_barlow_model(model_or_folder: BarlowTwinsPreTrainedModel | str | Path) -> BarlowTwinsPreTrainedModel:
    """Return the model itself, or load a saved Barlow Twins folder (pretraining, encoder or
    classifier) in fp32. Raises `FileNotFoundError` or `ValueError` saying what the folder is
    instead when it is not one."""
    if isinstance(model_or_folder, BarlowTwinsPreTrainedModel):
        return model_or_folder
    if isinstance(model_or_folder, nn.Module):
        raise TypeError(f"Expected a Barlow Twins model or a folder, got a {type(model_or_folder).__name__}.")
    folder = Path(model_or_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = ""
        if any(folder.glob("checkpoint-*")):
            hint = " It holds training checkpoints only; the model is saved in the output folder when the run ends."
        raise ValueError(
            f"{folder} is not a saved model folder (no config.json). Give the output_dir of barlow-pretrain "
            f"or a folder written by save_pretrained.{hint}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("model_type") != BarlowTwinsConfig.model_type:
        if isinstance(config, dict) and "pretrained_cfg" in config:
            what = "a timm-format folder (already exported; upload it as it is)"
        else:
            what = f"model_type {config.get('model_type')!r}" if isinstance(config, dict) else "not a model config"
        raise ValueError(f"{folder} is not a Barlow Twins model folder (model_type 'barlow_twins'): it is {what}.")
    architecture = (config.get("architectures") or ["BarlowTwinsForPreTraining"])[0]
    if architecture not in _MODEL_CLASSES:
        raise ValueError(
            f"{folder}: unknown architecture {architecture!r}; expected one of {', '.join(_MODEL_CLASSES)}."
        )
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"{folder} has a config.json but no model.safetensors: the weights are missing.")
    logger.info(f"Loading {architecture} from {folder}")
    try:
        return _MODEL_CLASSES[architecture].from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(
            f"Could not load the {architecture} in {folder} (damaged or incomplete files?): {error}"
        ) from None


def _encoder(model: BarlowTwinsPreTrainedModel) -> BarlowTwinsModel:
    return model if isinstance(model, BarlowTwinsModel) else model.barlow_twins


def _is_classifier(model: BarlowTwinsPreTrainedModel) -> bool:
    return isinstance(model, BarlowTwinsForImageClassification)


def timm_incompatibility(config: BarlowTwinsConfig) -> str | None:
    """Why plain timm cannot rebuild this network from a config, or None when it can."""
    if config.small_image_stem:
        return (
            "it uses the small-image stem (a 3x3 stride-1 first convolution and no max-pool). timm's ResNet "
            "has no argument for that stem, so a timm config would rebuild the 7x7 stride-2 stem and the "
            "max-pool: a different network from the one that was trained"
        )
    return None


def _timm_classifier_name(config: BarlowTwinsConfig) -> str:
    # Built on the meta device (no memory): only the name of timm's classifier module is needed.
    with torch.device("meta"):
        network = timm.create_model(
            config.backbone, pretrained=False, num_classes=config.num_labels, **config.backbone_kwargs
        )
    classifier = network.get_classifier()
    name = next((name for name, module in network.named_modules() if module is classifier), None)
    if name is None or not isinstance(classifier, nn.Linear):
        raise TimmExportError(
            f"timm's {config.backbone!r} has no single linear classifier to hold the fine-tuned head."
        )
    return name


def timm_hub_config(model: BarlowTwinsPreTrainedModel) -> dict[str, Any]:
    """The timm hub `config.json` for `model`'s encoder (and classifier head, for a classifier).

    `model_args` are the backbone arguments only: never `num_classes` (TimmWrapper passes its own,
    and timm 1.0's exporter writing it there breaks TimmWrapper), nor `zero_init_last`, which only
    affects initialisation. Preprocessing comes from our config, not from timm's ImageNet
    defaults for the architecture, which describe other weights.
    """
    config = model.config
    backbone = _encoder(model).backbone
    source_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    num_classes = config.num_labels if _is_classifier(model) else 0
    pretrained_cfg = {
        "input_size": [config.num_channels, config.image_size, config.image_size],
        "fixed_input_size": bool(source_cfg.get("fixed_input_size", False)),
        "interpolation": config.interpolation,
        "crop_pct": config.crop_pct,
        "crop_mode": "center",
        "mean": list(config.image_mean),
        "std": list(config.image_std),
        "num_classes": num_classes,
        "first_conv": source_cfg.get("first_conv"),
        "classifier": source_cfg.get("classifier"),
        **PAPER,
    }
    hub_config: dict[str, Any] = {
        "architecture": config.backbone,
        "num_classes": num_classes,
        "num_features": int(backbone.num_features),
        "model_args": dict(config.backbone_kwargs),
        "pretrained_cfg": {key: value for key, value in pretrained_cfg.items() if value is not None},
    }
    if num_classes:
        hub_config["label_names"] = [config.id2label[i] for i in range(num_classes)]
    if not hub_config["model_args"]:
        del hub_config["model_args"]
    return hub_config


def timm_state_dict(model: BarlowTwinsPreTrainedModel) -> dict[str, torch.Tensor]:
    """The backbone's weights under timm's key names (our `barlow_twins.backbone.` prefix
    dropped), plus the classifier under timm's classifier name for a fine-tuned classifier."""
    tensors = {name: tensor.detach().cpu().clone() for name, tensor in _encoder(model).backbone.state_dict().items()}
    if _is_classifier(model):
        head = _timm_classifier_name(model.config)
        tensors[f"{head}.weight"] = model.classifier.weight.detach().cpu().clone()
        tensors[f"{head}.bias"] = model.classifier.bias.detach().cpu().clone()
    return tensors


def _reference(model: BarlowTwinsPreTrainedModel) -> BarlowTwinsPreTrainedModel:
    # A CPU fp32 copy in eval mode, so the caller's model keeps its device, dtype and mode.
    part = model if _is_classifier(model) else _encoder(model)
    return copy.deepcopy(part).to(device="cpu", dtype=torch.float32).eval()


@torch.no_grad()
def verify_timm_export(folder: str | Path, model: BarlowTwinsPreTrainedModel, atol: float = 1e-5) -> float:
    """Rebuild the exported folder with plain timm and check it computes what `model` computes
    (pooled features, or logits for a classifier) on a random batch. Returns the largest absolute
    difference; raises `TimmExportError` when the weights don't fit or the outputs differ."""
    try:
        network = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise TimmExportError(f"timm cannot load the exported folder {folder}: {error}") from error
    config = model.config
    # Networks that accept any input size are compared on one image of <= 64 px (a 2x2 map before
    # a ResNet's pooling, so a different pooling shows): a different stem, pooling or weight shows
    # there as well as at 224 px, where a ResNet-50 takes seconds on a CPU.
    fixed = network.pretrained_cfg.get("fixed_input_size", False)
    size = config.image_size if fixed else min(config.image_size, 64)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, config.num_channels, size, size, generator=generator)
    reference = _reference(model)
    expected = reference(pixels).logits if _is_classifier(model) else reference(pixels).pooler_output
    actual = network(pixels)
    if actual.shape != expected.shape:
        raise TimmExportError(f"timm's network returns shape {tuple(actual.shape)}, ours {tuple(expected.shape)}.")
    difference = (actual - expected).abs().max().item()
    if not torch.allclose(actual, expected, atol=atol, rtol=1e-4):
        raise TimmExportError(
            f"timm's rebuilt network differs from the trained one (max |difference| {difference:.3g})."
        )
    return difference


def _prepare_folder(output_dir: str | Path) -> Path:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def export_timm_encoder(
    model_or_folder: BarlowTwinsPreTrainedModel | str | Path, output_dir: str | Path, *, verify: bool = True
) -> Path:
    """Write the encoder in timm's hub format: `config.json` and `model.safetensors`.

    The folder needs neither this project nor `trust_remote_code`:
    `timm.create_model("local-dir:<output_dir>", pretrained=True)`, `AutoModel.from_pretrained`
    (TimmWrapperModel), `pipeline("image-feature-extraction", ...)` and
    `AutoModelForImageClassification.from_pretrained(..., num_labels=K)` all load it. A fine-tuned
    `BarlowTwinsForImageClassification` keeps its head and label names.

    Args:
        model_or_folder: a Barlow Twins model, or a folder saved from one.
        output_dir: the folder to write (created if needed).
        verify: rebuild the folder with timm and compare outputs with the model (recommended).

    Raises:
        TimmExportError: the network is not one plain timm can rebuild (e.g. the small-image stem);
            use `export_encoder_with_code` (or `export_encoder`, which falls back to it) instead.

    Example:
        >>> from hub import export_timm_encoder
        >>> export_timm_encoder("barlow-resnet18", "barlow-resnet18-timm")  # doctest: +SKIP
    """
    model = load_barlow_model(model_or_folder)
    reason = timm_incompatibility(model.config)
    if reason:
        raise TimmExportError(
            f"This encoder cannot be a plain timm repository: {reason}. Export it with our classes and code "
            f"files instead (loads with trust_remote_code=True): hub.export_encoder_with_code(model, output_dir), "
            f"or hub.export_encoder(...), which chooses for you."
        )
    folder = _prepare_folder(output_dir)
    hub_config = timm_hub_config(model)
    tensors = timm_state_dict(model)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hub_config, indent=2) + "\n", encoding="utf-8")
    if verify:
        try:
            difference = verify_timm_export(folder, model)
        except TimmExportError:
            # Never leave a timm config behind that builds a different network.
            (folder / "config.json").unlink(missing_ok=True)
            (folder / "model.safetensors").unlink(missing_ok=True)
            raise
        logger.info(f"timm rebuilds the exported encoder exactly (max |difference| {difference:.2g}).")
    logger.info(f"Wrote the timm-format encoder ({model.config.backbone}) to {folder}")
    return folder


def export_encoder_with_code(model_or_folder: BarlowTwinsPreTrainedModel | str | Path, output_dir: str | Path) -> Path:
    """Write the encoder (with its head, for a fine-tuned classifier) in our classes, with the code
    files, `auto_map` and the image processor. Loads with `trust_remote_code=True` in `AutoModel`,
    `AutoModelForImageClassification` and the pipelines, without this project installed."""
    model = load_barlow_model(model_or_folder)
    folder = _prepare_folder(output_dir)
    part = model if _is_classifier(model) else _encoder(model)
    # A shallow copy with its own config: save_pretrained rewrites `architectures`, which must not
    # leak into the caller's (possibly shared) config.
    part = copy.copy(part)
    part.config = copy.deepcopy(part.config)
    part.save_pretrained(folder)
    create_image_processor(part.config).save_pretrained(folder)
    logger.info(f"Wrote the encoder with its code files (trust_remote_code) to {folder}")
    return folder


def export_encoder(
    model_or_folder: BarlowTwinsPreTrainedModel | str | Path, output_dir: str | Path
) -> Literal["timm", "transformers"]:
    """Export the encoder in timm's format when timm can rebuild it, otherwise with our classes
    and code files, saying why in a warning. Returns the format written."""
    return _export_encoder(load_barlow_model(model_or_folder), output_dir)[0]


def _export_encoder(model: BarlowTwinsPreTrainedModel, output_dir: str | Path) -> tuple[str, str | None]:
    reason = timm_incompatibility(model.config)
    if reason is None:
        try:
            export_timm_encoder(model, output_dir)
            return "timm", None
        except TimmExportError as error:
            reason = str(error)
    logger.warning(f"Not a timm repository: {reason}. Writing our classes and code files (trust_remote_code) instead.")
    export_encoder_with_code(model, output_dir)
    return "transformers", reason


def export_full_model(model_or_folder: BarlowTwinsPreTrainedModel | str | Path, output_dir: str | Path) -> Path:
    """Write encoder and projector (`BarlowTwinsForPreTraining`) with the code files, `auto_map`
    and the image processor, for continuing pretraining. Loads with `trust_remote_code=True`."""
    model = load_barlow_model(model_or_folder)
    if not isinstance(model, BarlowTwinsForPreTraining):
        raise ValueError(
            f"The full model needs the projector, but this is a {type(model).__name__} (no projector). "
            f"Export its encoder instead (--format encoder)."
        )
    folder = _prepare_folder(output_dir)
    model.save_pretrained(folder)
    create_image_processor(model.config).save_pretrained(folder)
    logger.info(f"Wrote the full model (encoder and projector, trust_remote_code) to {folder}")
    return folder


def export_model(
    model_or_folder: BarlowTwinsPreTrainedModel | str | Path,
    output_dir: str | Path,
    format: Literal["encoder", "full", "both"] = "encoder",
) -> ExportResult:
    """Write a repository folder in one of `EXPORT_FORMATS`:

    * `encoder`: the encoder at the root, in timm's format when possible (see `export_encoder`);
    * `full`: `BarlowTwinsForPreTraining` at the root;
    * `both`: the encoder at the root and the full model in `pretraining/`. The code files are
      also copied to the root, because transformers looks for remote code at the repository root
      even with `subfolder=`.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
    model = load_barlow_model(model_or_folder)
    folder = _prepare_folder(output_dir)
    if format == "full":
        export_full_model(model, folder)
        return ExportResult(folder, None, "")
    if format == "both" and not isinstance(model, BarlowTwinsForPreTraining):
        raise ValueError(
            f"--format both needs the projector, but this is a {type(model).__name__}; use --format encoder."
        )
    encoder_format, reason = _export_encoder(model, folder)
    notes = [f"The encoder is not a plain timm repository: {reason}."] if reason else []
    if format == "encoder":
        return ExportResult(folder, encoder_format, None, notes)
    export_full_model(model, folder / PRETRAINING_SUBFOLDER)
    for source in sorted((folder / PRETRAINING_SUBFOLDER).glob("*.py")):
        if not (folder / source.name).exists():
            shutil.copyfile(source, folder / source.name)
    return ExportResult(folder, encoder_format, PRETRAINING_SUBFOLDER, notes)
