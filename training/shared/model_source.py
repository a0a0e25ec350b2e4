"""The model that barlow-eval and barlow-finetune start from.

:func:`load_model_source` reads ``--model_name_or_path`` (a pretraining, encoder or classifier
folder, or a hub id) into a :class:`ModelSource`, which builds the frozen encoder or a
classifier and knows the model's preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from barlow_cli import UsageError
from modeling_barlow import BarlowTwinsConfig, create_image_processor

from .augment import supervised_train_transform
from .data import file_stamps

__all__ = [
    "ModelSource",
    "classification_head",
    "load_model_source",
    "processor_transform",
]

logger = logging.getLogger(__name__)

_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resampling ids
# Weights are float32 whatever a checkpoint was saved in (from_pretrained's default, dtype="auto",
# keeps a bf16 export in bf16): the protocols train in float32 and get bf16 from
# --mixed_precision's autocast, and a bf16 model would refuse the float32 images on a CPU.
_WEIGHTS_DTYPE = torch.float32

# ------------------------------------------------------------------------------------------ model
@dataclass
class ModelSource:
    """A model given by ``--model_name_or_path``, and everything about it the protocols need.

    ``random_init`` builds the same architecture with fresh weights (seeded), for baselines.
    """

    name: str
    config: Any
    processor: Any
    fingerprint: dict
    random_init: bool = False
    seed: int = 42

    @property
    def is_barlow_twins(self) -> bool:
        return isinstance(self.config, BarlowTwinsConfig)

    def _preprocessing(self) -> tuple[int, list[float], list[float], str, int]:
        """(image size, mean, std, interpolation name, channels) of the model's inputs."""
        if self.is_barlow_twins:
            c = self.config
            return c.image_size, list(c.image_mean), list(c.image_std), c.interpolation, c.num_channels
        p = self.processor
        data_config = getattr(p, "data_config", None)  # TimmWrapperImageProcessor: timm's own data config
        if isinstance(data_config, dict):
            channels, _, size = data_config["input_size"]
            return size, list(data_config["mean"]), list(data_config["std"]), data_config["interpolation"], channels
        crop = getattr(p, "crop_size", None) if getattr(p, "do_center_crop", False) else None
        sizes = crop or getattr(p, "size", None) or {}
        size = sizes.get("height") or sizes.get("shortest_edge")
        mean, std = getattr(p, "image_mean", None), getattr(p, "image_std", None)
        if not size or mean is None or std is None:
            raise ValueError(f"Cannot tell the input size and normalisation of {self.name} from its image processor.")
        resample = getattr(p, "resample", None)
        interpolation = _RESAMPLE_NAMES.get(int(resample), "bicubic") if resample is not None else "bicubic"
        return int(size), list(mean), list(std), interpolation, len(mean)

    @property
    def num_channels(self) -> int:
        return self._preprocessing()[4]

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> (C, S, S), as the model's image processor (and so its pipelines) does."""
        return processor_transform(self.processor)

    def train_transform(self, min_crop_scale: float = 0.08):
        """Random resized crop and flip at the model's resolution, normalised as it expects."""
        size, mean, std, interpolation, channels = self._preprocessing()
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            interpolation = "bicubic"
        return supervised_train_transform(size, mean, std, channels, interpolation, crop_scale=(min_crop_scale, 1.0))

    def preprocessing_key(self) -> dict:
        """What determines the evaluation inputs, for cache keys."""
        return {"processor": self.processor.to_dict(), "num_channels": self.num_channels}

    def _seeded(self) -> None:
        torch.manual_seed(self.seed)

    def encoder(self) -> nn.Module:
        """The encoder in eval mode; its output has ``pooler_output`` (B, F)."""
        if self.random_init:
            self._seeded()
            model = AutoModel.from_config(self.config, dtype=_WEIGHTS_DTYPE)
        else:
            model, info = _load(AutoModel, self.name, output_loading_info=True)
            _check_no_missing(self.name, info, allowed=())
        _check_image_model(self.name, model)
        return model.eval()

    def classifier(self, label_names: Sequence[str]) -> tuple[nn.Module, nn.Module]:
        """(model, head): an image classifier for ``label_names`` on this encoder; ``id2label`` holds
        the names, and only the head is new (initialised N(0, 0.01) for Barlow Twins models)."""
        id2label = {i: str(name) for i, name in enumerate(label_names)}
        label2id = {name: i for i, name in id2label.items()}
        if self.random_init:
            config = AutoConfig.from_pretrained(self.name, num_labels=len(id2label), id2label=id2label, label2id=label2id)
            self._seeded()
            model = AutoModelForImageClassification.from_config(config, dtype=_WEIGHTS_DTYPE)
            head = classification_head(model)
        else:
            model, info = _load(
                AutoModelForImageClassification, self.name, num_labels=len(id2label), id2label=id2label,
                label2id=label2id, ignore_mismatched_sizes=True, output_loading_info=True,
            )
            head = classification_head(model)
            head_ids = {id(p) for p in head.parameters()}
            _check_no_missing(self.name, info, allowed={n for n, p in model.named_parameters() if id(p) in head_ids})
        _check_image_model(self.name, model)
        return model, head


def processor_transform(processor: Any) -> Callable[[Any], torch.Tensor]:
    """PIL image -> (C, S, S) through an image processor: evaluation sees exactly the preprocessing
    that users of the saved model (and its pipelines) get."""
    return lambda image: processor(image, return_tensors="pt")["pixel_values"][0]


def _load(auto_class, name: str, **kwargs):
    try:
        return auto_class.from_pretrained(name, dtype=_WEIGHTS_DTYPE, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"Cannot load {name} as {auto_class.__name__}: {error}") from error
    except RuntimeError as error:  # transformers refuses weights whose shapes differ from the config's
        raise ValueError(
            f"Cannot load {name}: its weights do not fit the architecture its config.json describes (shapes differ, "
            "see the load report above)."
        ) from error


def _check_no_missing(name: str, info: dict, allowed) -> None:
    missing = [key for key in info.get("missing_keys", []) if key not in allowed]
    missing += [key for key, *_ in info.get("mismatched_keys", []) if key not in allowed]
    if missing:
        raise ValueError(
            f"{name} lacks {len(missing)} encoder weight(s) (e.g. {missing[0]}): it is not a checkpoint of this "
            "architecture's encoder. Give a barlow-pretrain output folder or a saved encoder."
        )


def _check_image_model(name: str, model: nn.Module) -> None:
    if getattr(model, "main_input_name", None) != "pixel_values":
        raise UsageError(
            f"{name} is a {model.config.model_type} model that does not take images; give a barlow-pretrain output "
            "folder, a saved Barlow Twins encoder or another image model."
        )


def classification_head(model: nn.Module) -> nn.Module:
    """The layer that maps features to logits: ``classifier`` (Barlow Twins and most transformers
    image models) or the timm classifier of a TimmWrapper model."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Module):
        return head
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        return timm_model.get_classifier()
    raise ValueError(f"Cannot find the classification head of {type(model).__name__}.")


def _model_directory(name: str) -> tuple[Path, bool]:
    """(folder holding config.json, whether it is a local folder rather than a hub snapshot)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{name} is not a model folder (no config.json): give a barlow-pretrain output folder, a saved "
                "encoder or classifier folder, or a hub id."
            )
        return path.resolve(), True
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"Model folder {name} does not exist.")
    from transformers.utils import cached_file

    try:
        return Path(cached_file(name, "config.json")).parent, False
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{name} is neither a local folder nor a model on the hub (offline, HF_HUB_OFFLINE=1: only models in the "
            f"local cache): {error}"
        ) from error


def _model_files(folder: Path) -> list:
    """The files from_pretrained reads: config.json and the weights (not metrics or checkpoints)."""
    return file_stamps(
        (p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
         or p.name.endswith(".safetensors.index.json")),
        folder,
    )


def load_model_source(name: str, random_init: bool = False, seed: int = 42) -> ModelSource:
    """Resolve ``--model_name_or_path``: its config, image processor and a fingerprint of its
    weights (local folder: path, sizes and modification times; hub: the snapshot's commit).

    Raises FileNotFoundError for a missing folder or an unknown hub id, ValueError for a folder
    that is not an image model."""
    directory, local = _model_directory(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{name} is not a model transformers can read: {error}") from error
    if isinstance(config, BarlowTwinsConfig):
        processor = create_image_processor(config)
    else:
        try:
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError, KeyError) as error:
            raise UsageError(
                f"{name} ({config.model_type}) has no image processor (preprocessor_config.json), so its preprocessing "
                f"is unknown: {error}"
            ) from error
    if local:
        fingerprint = {"path": str(directory), "files": _model_files(directory)}
    else:
        fingerprint = {"hub": name, "snapshot": directory.name}
    if random_init:
        fingerprint = {"random_init": True, "seed": seed, "config": config.to_dict()}
    return ModelSource(name, config, processor, fingerprint, random_init, seed)
