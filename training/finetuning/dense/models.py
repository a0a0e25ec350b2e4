"""The dense model a run fine-tunes: DETR or UperNet on the encoder, and its image processor."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import (
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    SegformerImageProcessor,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from barlow_cli import UsageError
from modeling_barlow import (
    BarlowTwinsBackbone,
    BarlowTwinsConfig,
    barlow_detr_for_object_detection,
    barlow_upernet_for_semantic_segmentation,
    default_pyramid_indices,
    encoder_backbone_config,
)

__all__ = ["DenseModel", "build_dense_model"]

logger = logging.getLogger(__name__)


class DenseModel:
    """The model, its processor and where its backbone is (for learning rates and freezing)."""

    def __init__(self, model: nn.Module, processor, backbone_config: BarlowTwinsConfig) -> None:
        self.model, self.processor, self.backbone_config = model, processor, backbone_config

    @property
    def backbone(self) -> BarlowTwinsBackbone:
        return next(m for m in self.model.modules() if isinstance(m, BarlowTwinsBackbone))

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything the backbone does not hold: DETR's transformer and heads, UperNet's pyramid."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.model.parameters() if id(p) not in backbone]


def build_dense_model(
    task: str,
    encoder: str,
    id2label: dict[int, str],
    *,
    image_size: int | None = None,
    out_indices: list[int] | None = None,
    head_config: dict | None = None,
    random_init: bool = False,
    seed: int = 42,
) -> DenseModel:
    """DETR (object-detection) or UperNet (semantic-segmentation) on the encoder folder `encoder`,
    its weights loaded and checked after the model is built, or with `random_init` the same
    architecture with timm's fresh initialisation (seeded), for baselines."""
    config = encoder_backbone_config(encoder)
    if config.num_channels != 3:
        raise ValueError(
            f"{encoder} takes {config.num_channels}-channel images; the detection and segmentation image processors "
            "and pipelines take RGB images, so dense fine-tuning needs a 3-channel encoder."
        )
    size = image_size or config.image_size
    if out_indices is None:
        out_indices = [len(config.stage_names) - 1] if task == "object-detection" else default_pyramid_indices(config)
    else:
        try:  # the config's own check names the stages and the valid indices
            config.out_indices = list(out_indices)
        except ValueError as error:
            raise UsageError(f"--out_indices {' '.join(map(str, out_indices))}: {error}") from None
    head_config = dict(head_config or {})
    torch.manual_seed(seed)
    if random_init:
        backbone_config = encoder_backbone_config(encoder, out_indices)
        backbone_config.image_size = size
        model = _from_config(task, backbone_config, id2label, head_config)
    elif task == "object-detection":
        model = barlow_detr_for_object_detection(encoder, id2label, out_indices, **head_config)
    else:
        model = barlow_upernet_for_semantic_segmentation(encoder, id2label, out_indices, **head_config)
    backbone_config = next(m for m in model.modules() if isinstance(m, BarlowTwinsBackbone)).config
    backbone_config.image_size = size  # the resolution the dense model is trained at (the record of it)
    processor = _processor(task, backbone_config, size)
    return DenseModel(model, processor, backbone_config)


def _from_config(task: str, backbone_config: BarlowTwinsConfig, id2label: dict[int, str], head_config: dict) -> nn.Module:
    labels = {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    if task == "object-detection":
        return DetrForObjectDetection(DetrConfig(backbone_config=backbone_config, **labels, **head_config))
    channels = [backbone_config.feature_stages()[i][1] for i in backbone_config.out_indices]
    if len(channels) > 2:
        head_config.setdefault("auxiliary_in_channels", channels[2])
    else:
        head_config.setdefault("use_auxiliary_head", False)
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, **labels, **head_config))


def _processor(task: str, config: BarlowTwinsConfig, size: int):
    """The image processor the saved folder's pipeline uses: resize to size x size and normalise with
    the encoder's statistics, as the run's evaluation transform does."""
    common = {"do_resize": True, "size": {"height": size, "width": size}, "do_normalize": True,
              "image_mean": list(config.image_mean), "image_std": list(config.image_std)}
    if task == "object-detection":
        return DetrImageProcessor(**common, do_pad=False)
    return SegformerImageProcessor(**common, do_reduce_labels=False)
