"""The timm hub format of an encoder: whether timm can rebuild it, its `config.json` and weights,
and the check that timm's rebuilt network computes what ours does.

The folder is `config.json` (`architecture`, `num_features`, `model_args`, `pretrained_cfg`) and
`model.safetensors` with timm's own key names. `hub.export.export_timm_encoder` writes it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsModel,
    BarlowTwinsPreTrainedModel,
)


__all__ = ["TimmExportError", "timm_hub_config", "timm_incompatibility", "timm_state_dict", "verify_timm_export"]

PAPER = {
    "paper_ids": "arXiv:2103.03230",
    "paper_name": "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
}


class TimmExportError(ValueError):
    """The model cannot be written as a plain timm repository without changing the network."""


def _encoder(model: BarlowTwinsPreTrainedModel) -> BarlowTwinsModel:
    return model if isinstance(model, BarlowTwinsModel) else model.barlow_twins


def _is_classifier(model: BarlowTwinsPreTrainedModel) -> bool:
    return isinstance(model, BarlowTwinsForImageClassification)


def timm_incompatibility(config: BarlowTwinsConfig) -> str | None:
    """Why plain timm cannot rebuild this network from a config, or None when it can."""
    if config.num_channels == 1:
        return (
            "it takes one-channel images. transformers' pipelines and timm's preprocessing give RGB images, "
            "which timm's one-channel network refuses; this project's encoder turns them into luminance itself"
        )
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
