"""Barlow Twins as transformers models on any timm backbone.

Importing this package registers the classes with transformers' Auto classes, and marks them so
that `save_pretrained` copies the code files and writes `auto_map` (loadable elsewhere with
`trust_remote_code=True`).
"""

import os

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    BitImageProcessor,
)

from .configuration_barlow_twins import BarlowTwinsConfig
from .dense_heads import (
    barlow_detr_for_object_detection,
    barlow_upernet_for_semantic_segmentation,
    default_pyramid_indices,
    encoder_backbone_config,
    load_encoder_into_backbones,
)
from .distributed import GlobalBatchNorm, convert_to_global_batchnorm
from .image_processing import create_image_processor
from .loss import BarlowTwinsLossOutput, barlow_twins_loss, cross_correlation
from .modeling_barlow_twins import (
    BarlowTwinsBackbone,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsForPreTrainingOutput,
    BarlowTwinsModel,
    BarlowTwinsPreTrainedModel,
    BarlowTwinsProjector,
    init_linear_evaluation_head,
)


__all__ = [
    "BarlowTwinsBackbone",
    "BarlowTwinsConfig",
    "BarlowTwinsForImageClassification",
    "BarlowTwinsForPreTraining",
    "BarlowTwinsForPreTrainingOutput",
    "BarlowTwinsLossOutput",
    "BarlowTwinsModel",
    "BarlowTwinsPreTrainedModel",
    "BarlowTwinsProjector",
    "GlobalBatchNorm",
    "barlow_detr_for_object_detection",
    "barlow_twins_loss",
    "barlow_upernet_for_semantic_segmentation",
    "convert_to_global_batchnorm",
    "create_image_processor",
    "cross_correlation",
    "default_pyramid_indices",
    "encoder_backbone_config",
    "init_linear_evaluation_head",
    "load_encoder_into_backbones",
]

AutoConfig.register(BarlowTwinsConfig.model_type, BarlowTwinsConfig, exist_ok=True)
AutoModel.register(BarlowTwinsConfig, BarlowTwinsModel, exist_ok=True)
AutoModelForPreTraining.register(BarlowTwinsConfig, BarlowTwinsForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(BarlowTwinsConfig, BarlowTwinsForImageClassification, exist_ok=True)
AutoBackbone.register(BarlowTwinsConfig, BarlowTwinsBackbone, exist_ok=True)
AutoImageProcessor.register(BarlowTwinsConfig, image_processor_classes={"torchvision": BitImageProcessor}, exist_ok=True)

BarlowTwinsConfig.register_for_auto_class()
BarlowTwinsModel.register_for_auto_class("AutoModel")
BarlowTwinsForPreTraining.register_for_auto_class("AutoModelForPreTraining")
BarlowTwinsForImageClassification.register_for_auto_class("AutoModelForImageClassification")
BarlowTwinsBackbone.register_for_auto_class("AutoBackbone")


def _auto_backbone_reads_local_folders() -> None:
    """transformers 5's `AutoBackbone.from_pretrained` first asks the hub whether the name is a
    repository (`HfApi.repo_exists`) and treats anything else as a timm model name, so a local
    folder never loads: an absolute path fails the repo-id check, a relative one is looked up online
    (and fails offline). A local folder now goes straight to the ordinary Auto loading, which is
    what transformers does once the hub has answered yes. Names that are not folders are untouched."""
    from transformers.models.auto.auto_factory import _BaseAutoBackboneClass, _BaseAutoModelClass

    original = _BaseAutoBackboneClass.__dict__["from_pretrained"].__func__
    if getattr(original, "_reads_local_folders", False):
        return

    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(pretrained_model_name_or_path):
            kwargs.pop("use_timm_backbone", None)
            return _BaseAutoModelClass.from_pretrained.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    from_pretrained._reads_local_folders = True
    from_pretrained.__doc__ = original.__doc__
    _BaseAutoBackboneClass.from_pretrained = classmethod(from_pretrained)


_auto_backbone_reads_local_folders()
