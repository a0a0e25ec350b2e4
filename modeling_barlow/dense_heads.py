"""transformers' detection and segmentation models on a pretrained Barlow Twins encoder.

A dense model is built from its config, and the backbone inside it is then a new network:
transformers' v5 configs no longer load a pretrained backbone (`use_pretrained_backbone` is
dropped), and building a model runs its initialisation over whatever the backbone held (a timm
backbone loaded with `use_pretrained_backbone=True` through `TimmBackboneConfig` ends up with
other weights). So these helpers build the model first and load the encoder into its
`BarlowTwinsBackbone` afterwards, and check, tensor by tensor, that the weights arrived.

Once fine-tuned and saved, such a model loads with its own `from_pretrained` (or the Auto classes
and pipelines) as long as this package is imported, since its config names the `barlow_twins`
backbone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import DetrConfig, DetrForObjectDetection, UperNetConfig, UperNetForSemanticSegmentation
from transformers.utils import cached_file

from .configuration_barlow_twins import BarlowTwinsConfig
from .modeling_barlow_twins import BarlowTwinsBackbone, BarlowTwinsModel, BarlowTwinsPreTrainedModel


__all__ = [
    "barlow_detr_for_object_detection",
    "barlow_upernet_for_semantic_segmentation",
    "default_pyramid_indices",
    "encoder_backbone_config",
    "load_encoder_into_backbones",
]

EncoderSource = str | os.PathLike | BarlowTwinsPreTrainedModel


def _timm_format(folder: Path) -> dict | None:
    """The config of a timm-format encoder folder (barlow-publish's default), else None."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return config if "architecture" in config and "pretrained_cfg" in config else None


def _local_folder(source: str | os.PathLike) -> Path:
    """A local folder as it is; a hub id as its snapshot in the HF cache (fetched unless offline)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    name = str(source)
    if folder.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"Encoder folder {name!r} does not exist.")
    try:
        config = cached_file(name, "config.json")
        cached_file(name, "model.safetensors")
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{name} is neither a local folder nor a model on the hub (offline, HF_HUB_OFFLINE=1: only models in the "
            f"local cache): {error}"
        ) from error
    return Path(config).parent


def _read_encoder(source: EncoderSource) -> tuple[BarlowTwinsConfig, dict[str, torch.Tensor]]:
    """(config, the timm network's weights under timm's names) of a Barlow Twins model or folder
    (pretraining, encoder or classifier) or of a timm-format encoder folder."""
    if isinstance(source, BarlowTwinsPreTrainedModel):
        encoder = source if isinstance(source, BarlowTwinsModel) else source.barlow_twins
        return source.config, {k: v.detach() for k, v in encoder.backbone.state_dict().items()}
    folder = _local_folder(source)
    timm_config = _timm_format(folder)
    if timm_config is not None:
        data = timm_config["pretrained_cfg"]
        config = BarlowTwinsConfig(
            backbone=timm_config["architecture"], backbone_kwargs=timm_config.get("model_args") or {},
            image_size=data["input_size"][-1], image_mean=data["mean"], image_std=data["std"],
            crop_pct=data.get("crop_pct", 1.0), interpolation=data.get("interpolation", "bicubic"),
        )
        weights = load_file(folder / "model.safetensors")
        own = _backbone_keys(config)
        return config, {k: v for k, v in weights.items() if k in own or not k.startswith(_TIMM_HEADS)}
    try:
        encoder = BarlowTwinsModel.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"{folder} is not a Barlow Twins encoder folder (a barlow-pretrain output, a saved encoder or classifier, or a "
            f"timm-format export): {error}"
        ) from error
    return encoder.config, {k: v.detach() for k, v in encoder.backbone.state_dict().items()}


# A timm-format classifier export also holds its classifier, under one of these; the backbone has
# none, though it may own other tensors there (ConvNeXt's head.norm), so keys are dropped one by one.
_TIMM_HEADS = ("fc.", "head.", "classifier.")


def _backbone_keys(config: BarlowTwinsConfig) -> set[str]:
    with torch.device("meta"):
        return set(BarlowTwinsModel(config).backbone.state_dict())


def encoder_backbone_config(encoder: EncoderSource, out_indices: list[int] | None = None) -> BarlowTwinsConfig:
    """The `BarlowTwinsConfig` of `encoder` (a folder or model) as a dense model's `backbone_config`,
    returning the stages `out_indices` (default: the last)."""
    config, _ = _read_encoder(encoder)
    config = BarlowTwinsConfig.from_dict(config.to_dict())  # a copy, whatever the source holds
    config.out_indices = list(out_indices) if out_indices is not None else [len(config.stage_names) - 1]
    return config


@torch.no_grad()
def load_encoder_into_backbones(model: nn.Module, encoder: EncoderSource) -> list[str]:
    """Copy the pretrained encoder's weights into every `BarlowTwinsBackbone` inside `model` (a DETR,
    UperNet, ... built from its config), then check that each backbone tensor equals the encoder's.

    Returns the names of the backbones loaded. Raises ValueError when the model has no
    `BarlowTwinsBackbone` or the encoder's architecture differs from the backbone's.
    DETR's frozen BatchNorms keep no `num_batches_tracked`; nothing else may be left out.
    """
    _, weights = _read_encoder(encoder)
    backbones = [(name, module) for name, module in model.named_modules() if isinstance(module, BarlowTwinsBackbone)]
    if not backbones:
        raise ValueError(f"{type(model).__name__} has no BarlowTwinsBackbone to load the encoder into.")
    for name, backbone in backbones:
        network = backbone.barlow_twins.backbone
        target = network.state_dict()
        missing = sorted(set(target) - set(weights))
        extra = sorted(k for k in set(weights) - set(target) if not k.endswith("num_batches_tracked"))
        mismatched = sorted(k for k in set(target) & set(weights) if target[k].shape != weights[k].shape)
        if missing or extra or mismatched:
            first = (missing or extra or mismatched)[0]
            raise ValueError(
                f"The encoder does not fit the backbone {name or type(model).__name__} ({backbone.config.backbone}): "
                f"{len(missing)} weight(s) missing, {len(extra)} unexpected, {len(mismatched)} of another shape "
                f"(e.g. {first}). Build the model with encoder_backbone_config(encoder)."
            )
        network.load_state_dict({k: weights[k] for k in target}, strict=True)
        loaded = network.state_dict()
        different = [k for k in target if not torch.equal(loaded[k].cpu(), weights[k].to(loaded[k].dtype).cpu())]
        if different:  # never expected; a model that silently trains from scratch is worse than an error
            raise RuntimeError(f"Backbone weights differ from the encoder after loading: {different[:3]}")
    return [name for name, _ in backbones]


def barlow_detr_for_object_detection(
    encoder: EncoderSource, id2label: dict[int, str], out_indices: list[int] | None = None, **detr_kwargs: Any
) -> DetrForObjectDetection:
    """transformers' DETR on the pretrained encoder: `DetrForObjectDetection` built from a `DetrConfig`
    whose `backbone_config` is the encoder's, then the encoder's weights loaded into it.

    `id2label` names the object classes; `detr_kwargs` go to `DetrConfig` (e.g. `num_queries`,
    `d_model`, `encoder_layers`). DETR reads the last of `out_indices` (default: the last stage).
    """
    config = DetrConfig(
        backbone_config=encoder_backbone_config(encoder, out_indices),
        id2label=dict(id2label), label2id={v: k for k, v in id2label.items()}, **detr_kwargs,
    )
    model = DetrForObjectDetection(config)
    load_encoder_into_backbones(model, encoder)
    return model


def default_pyramid_indices(config: BarlowTwinsConfig) -> list[int]:
    """Four stages for a feature pyramid: a CNN's last four (a ResNet's layer1 to layer4, not its
    stem), or for a ViT, whose blocks share one resolution, four evenly spaced blocks ending with the
    last (blocks 2, 5, 8 and 11 of twelve)."""
    stages = config.feature_stages()
    count = len(stages)
    if len({stride for _, _, stride in stages}) == 1 and count > 4:
        return [round(count * k / 4) - 1 for k in (1, 2, 3, 4)]
    return list(range(max(0, count - 4), count))


def barlow_upernet_for_semantic_segmentation(
    encoder: EncoderSource, id2label: dict[int, str], out_indices: list[int] | None = None, **upernet_kwargs: Any
) -> UperNetForSemanticSegmentation:
    """transformers' UperNet on the pretrained encoder, its weights loaded after the model is built.

    `out_indices` are the stages the pyramid reads (default: `default_pyramid_indices`);
    `upernet_kwargs` go to `UperNetConfig` (e.g. `hidden_size`, `use_auxiliary_head`).
    """
    if out_indices is None:
        out_indices = default_pyramid_indices(encoder_backbone_config(encoder))
    backbone_config = encoder_backbone_config(encoder, out_indices)
    channels = [backbone_config.feature_stages()[i][1] for i in out_indices]
    if len(channels) > 2:  # the auxiliary head reads the third map
        upernet_kwargs.setdefault("auxiliary_in_channels", channels[2])
    else:
        upernet_kwargs.setdefault("use_auxiliary_head", False)
    config = UperNetConfig(
        backbone_config=backbone_config, id2label=dict(id2label), label2id={v: k for k, v in id2label.items()},
        **upernet_kwargs,
    )
    model = UperNetForSemanticSegmentation(config)
    load_encoder_into_backbones(model, encoder)
    return model
