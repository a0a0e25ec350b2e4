"""Export Barlow Twins models into folders that load elsewhere.

Two layouts:

* **timm hub format** (`export_timm_encoder`, the format itself in `hub.timm_format`): `config.json`
  and `model.safetensors` with timm's own key names. It loads with
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
from typing import Literal

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from barlow_cli import UsageError
from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsModel,
    BarlowTwinsPreTrainedModel,
    create_image_processor,
)

from .timm_format import (
    TimmExportError,
    _encoder,
    _is_classifier,
    timm_hub_config,
    timm_incompatibility,
    timm_state_dict,
    verify_timm_export,
)


__all__ = [
    "EXPORT_FORMATS",
    "PRETRAINING_SUBFOLDER",
    "ExportResult",
    "export_encoder",
    "export_encoder_with_code",
    "export_full_model",
    "export_model",
    "export_timm_encoder",
    "load_barlow_model",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("encoder", "full", "both")
# With --format both the repository root is the encoder (what most users load) and the full
# model sits below it; from_pretrained(repo, subfolder=PRETRAINING_SUBFOLDER) reaches it.
PRETRAINING_SUBFOLDER = "pretraining"

_MODEL_CLASSES: dict[str, type[BarlowTwinsPreTrainedModel]] = {
    cls.__name__: cls for cls in (BarlowTwinsForPreTraining, BarlowTwinsModel, BarlowTwinsForImageClassification)
}


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
        raise UsageError(
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
        raise UsageError(f"{folder} is not a Barlow Twins model folder (model_type 'barlow_twins'): it is {what}.")
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
