"""barlow-convert: the authors' released Barlow Twins checkpoints as timm and transformers folders.

    barlow-convert --checkpoint resnet50.pth --output_dir barlow-resnet50            # the backbone file
    barlow-convert --checkpoint checkpoint.pth --output_dir barlow-resnet50 --format both

Either file of facebookresearch/barlowtwins is recognised by its keys:

* the backbone file (`resnet50.pth`): a torchvision ResNet state dict without `fc.*`. It becomes
  the encoder in timm's format (timm's ResNets use torchvision's key names).
* the full training checkpoint (`checkpoint.pth`): `{"epoch", "model", "optimizer"}` whose model
  keys are `module.backbone.*`, `module.projector.*` and `module.bn.*`. It becomes a
  `BarlowTwinsForPreTraining` folder (encoder and projector; the widths are read from the weights)
  and the timm encoder. The final affine-free BatchNorm (`module.bn`) is dropped: it only
  normalises embeddings inside the loss, which uses each batch's own statistics.

Files are read with `torch.load(weights_only=True)` only: a file that needs arbitrary unpickling
is refused.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, BarlowTwinsModel, BarlowTwinsPreTrainedModel
from barlow_cli import UsageError, parse_arguments, run_command, setup_logging

from .export import EXPORT_FORMATS, ExportResult
from .publish import prepare_output_folder, write_repository


__all__ = ["ConvertArguments", "convert_checkpoint", "load_official_checkpoint", "main", "official_to_model"]

logger = logging.getLogger(__name__)

# torchvision and timm share these architectures' key names; the release is ResNet-50.
RESNETS = ("resnet50", "resnet18", "resnet34", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")
# The authors' linear-evaluation preprocessing: Resize(256) (bilinear), CenterCrop(224).
RELEASE_PREPROCESSING = {"image_size": 224, "crop_pct": 224 / 256, "interpolation": "bilinear"}
RELEASE_NOTE = (
    "Converted without changing any weight from a checkpoint in the format of the authors' release "
    "([facebookresearch/barlowtwins](https://github.com/facebookresearch/barlowtwins), MIT license). "
    "Their released ResNet-50 was pretrained on ImageNet-1k without labels for 1000 epochs with batch 2048, "
    "LARS (learning rates 0.2 for weights and 0.0048 for biases per 256 images), lambda 0.0051 and projector "
    "8192-8192-8192; they report 73.5% top-1 and 91.0% top-5 ImageNet linear-probe accuracy for it. "
    "A checkpoint from another run of their code has its own settings."
)
_EXPECTED = (
    "Expected one of the authors' two files: (a) the backbone file, a torchvision ResNet state dict "
    "(conv1.weight, bn1.*, layer1.0.conv1.weight, ...) without fc.*; or (b) the full training checkpoint, a dict "
    "with 'epoch', 'model' and 'optimizer' whose 'model' keys are module.backbone.*, module.projector.{0,3,6}.weight, "
    "module.projector.{1,4}.* and module.bn.*."
)


def load_official_checkpoint(path: str | Path) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`, with clear errors: a file that
    needs arbitrary unpickling is refused (it could run code), other unreadable files explained."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--checkpoint {file}: no such file.")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch words both cases as "Weights only load failed"; only a disallowed global means
        # the file wants to build arbitrary objects. Anything else is a file torch cannot parse.
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", str(error))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise UsageError(
                f"Refusing {file}: it is not a weights-only file (it needs unpickling of arbitrary Python objects, "
                f"here {found[1]}, which can run code). The authors' files load weights-only. If you trust this "
                f"file, re-save just its tensors (e.g. its state dict) and convert that."
            ) from None
        reason = detail[1].strip() if detail else str(error).splitlines()[0]
        raise UsageError(f"{file} is not a readable PyTorch checkpoint ({reason}).") from None
    except Exception as error:  # noqa: BLE001 - torch's legacy reader fails in many ways on other files
        # (a text file raises KeyError on its first byte): none of them is a checkpoint.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{file} is not a readable PyTorch checkpoint ({type(error).__name__}: {reason}).") from None


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())
    )


def _match_resnet(state_dict: dict[str, torch.Tensor]) -> str:
    """The timm/torchvision ResNet whose headless state dict has exactly these keys and shapes."""
    for name in RESNETS:
        with torch.device("meta"):  # shapes only, no memory
            expected = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
        if expected.keys() == state_dict.keys() and all(expected[k].shape == state_dict[k].shape for k in expected):
            return name
    if any(key.startswith("fc.") for key in state_dict):
        raise UsageError(
            f"This ResNet state dict has a classifier (fc.*); the authors' backbone file has none. {_EXPECTED}"
        )
    raise UsageError(f"The state dict is not a torchvision ResNet ({', '.join(RESNETS)}) backbone. {_EXPECTED}")


def _release_config(backbone: str, projector_dims: list[int] | None = None) -> BarlowTwinsConfig:
    # Without a projector (the backbone file) the config keeps the release's 8192-8192-8192.
    kwargs = {"projector_dims": projector_dims} if projector_dims else {}
    return BarlowTwinsConfig(backbone=backbone, **kwargs, **RELEASE_PREPROCESSING)


def _split_full_checkpoint(model_state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    keys = list(model_state)
    # DistributedDataParallel prefixes "module."; a checkpoint saved without it is accepted too.
    prefix = "module." if all(key.startswith("module.") for key in keys) else ""
    backbone, projector, dropped, unknown = {}, {}, [], []
    for key, tensor in model_state.items():
        name = key[len(prefix) :]
        if name.startswith("backbone."):
            backbone[name[len("backbone.") :]] = tensor
        elif name.startswith("projector."):
            projector[name[len("projector.") :]] = tensor
        elif name.startswith("bn."):
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown or not backbone or not projector:
        shown = ", ".join(unknown[:5]) or "no backbone.* or projector.* keys"
        raise UsageError(f"The checkpoint's model is not the authors' Barlow Twins module ({shown}). {_EXPECTED}")
    return backbone, projector, dropped


def _projector_dims(projector: dict[str, torch.Tensor], in_features: int) -> list[int]:
    # The authors' projector: Linear(bias=False) at indices 0, 3, 6, ... with BatchNorm1d after all
    # but the last, the same layout as BarlowTwinsProjector; the widths are the weights' rows.
    linear = sorted(
        int(m[1]) for key in projector if (m := re.fullmatch(r"(\d+)\.weight", key)) and projector[key].ndim == 2
    )
    if not linear or linear != list(range(0, 3 * len(linear), 3)):
        raise UsageError(f"Unexpected projector layout (linear layers at {linear}). {_EXPECTED}")
    if projector["0.weight"].shape[1] != in_features:
        raise UsageError(
            f"The projector takes {projector['0.weight'].shape[1]} features, but the backbone gives {in_features}."
        )
    return [int(projector[f"{index}.weight"].shape[0]) for index in linear]


def official_to_model(checkpoint: Any) -> tuple[BarlowTwinsPreTrainedModel, list[str]]:
    """Build our model from an already loaded official checkpoint: `BarlowTwinsModel` from the
    backbone file, `BarlowTwinsForPreTraining` from the full checkpoint. Returns the model (eval
    mode, weights loaded strictly) and notes about what was left out."""
    notes: list[str] = []
    if isinstance(checkpoint, dict) and {"model", "epoch"} <= set(checkpoint) and _is_state_dict(checkpoint["model"]):
        backbone, projector, dropped = _split_full_checkpoint(checkpoint["model"])
        architecture = _match_resnet(backbone)
        with torch.device("meta"):
            num_features = timm.create_model(architecture, pretrained=False, num_classes=0).num_features
        dims = _projector_dims(projector, num_features)
        model = BarlowTwinsForPreTraining(_release_config(architecture, dims))
        model.barlow_twins.backbone.load_state_dict(backbone, strict=True)
        try:
            model.projector.load_state_dict(projector, strict=True)
        except RuntimeError as error:
            raise UsageError(f"The projector's weights do not fit widths {dims}: {error}. {_EXPECTED}") from None
        if dropped:
            notes.append(
                f"Dropped the final affine-free BatchNorm ({', '.join(dropped)}): it has no weights, and the loss "
                f"normalises each batch with its own statistics, so its running averages are never used."
            )
        epoch = checkpoint["epoch"]
        notes.append(
            f"Converted from a full training checkpoint saved after epoch {epoch}; the optimizer state is not kept."
        )
        logger.info(f"Full checkpoint: {architecture} backbone, projector {'-'.join(map(str, dims))}, epoch {epoch}.")
    elif _is_state_dict(checkpoint):
        architecture = _match_resnet(checkpoint)
        model = BarlowTwinsModel(_release_config(architecture))
        model.backbone.load_state_dict(checkpoint, strict=True)
        logger.info(f"Backbone file: {architecture} without classifier.")
    else:
        found = type(checkpoint).__name__
        if isinstance(checkpoint, dict):
            found = f"a dict with keys {sorted(map(str, checkpoint))[:8]}"
        raise UsageError(f"Unrecognised checkpoint: found {found}. {_EXPECTED}")
    for note in notes:
        logger.info(note)
    return model.eval(), notes


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    format: Literal["encoder", "full", "both"] | None = None,
    overwrite_output_dir: bool = False,
) -> ExportResult:
    """Convert one of the authors' files into a repository folder with a model card.

    `format` defaults to `"both"` for the full checkpoint (timm encoder at the root, full model in
    `pretraining/`) and `"encoder"` for the backbone file, which has no projector.
    """
    if format is not None and format not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
    model, notes = official_to_model(load_official_checkpoint(checkpoint))
    has_projector = isinstance(model, BarlowTwinsForPreTraining)
    if format is None:
        format = "both" if has_projector else "encoder"
    if format != "encoder" and not has_projector:
        raise UsageError(
            f"--format {format} needs the projector, which only the full training checkpoint has; use --format encoder."
        )
    folder = prepare_output_folder(output_dir, overwrite=overwrite_output_dir, option="--output_dir")
    # The card names no dataset: this file may come from a run on other data than the release's.
    result = write_repository(model, folder, format=format, training_source=RELEASE_NOTE, notes=notes, license="mit")
    logger.info(
        f"Wrote {folder} (encoder: {result.encoder_format or 'none'}, full model: {result.pretraining_subfolder})"
    )
    return result


@dataclass
class ConvertArguments:
    """The checkpoint to convert and where to write it."""

    checkpoint: str | None = field(
        default=None, metadata={"help": "The authors' resnet50.pth or checkpoint.pth (required)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "The folder to write (required; must be new or empty)."}
    )
    format: str | None = field(
        default=None,
        metadata={
            "help": "encoder (timm format), full (BarlowTwinsForPreTraining) or both; defaults to both for the full "
            "checkpoint and encoder for the backbone file.",
            "choices": list(EXPORT_FORMATS),
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Empty --output_dir first when it holds files."}
    )

    def __post_init__(self):
        if not self.checkpoint or not self.output_dir:
            raise UsageError("--checkpoint and --output_dir are required.")


def main(argv: list[str] | None = None) -> None:
    """The `barlow-convert` command: bad options and refused or unrecognised files exit with code 2
    (something to change), failures with code 1, each with a message instead of a traceback."""
    (args,) = parse_arguments((ConvertArguments,), argv, description=__doc__)
    setup_logging()

    def run() -> None:
        result = convert_checkpoint(**asdict(args))
        print(f"Converted {args.checkpoint} into {result.folder}")

    run_command("barlow-convert", run)


if __name__ == "__main__":
    main()
