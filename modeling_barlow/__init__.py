"""Barlow Twins as transformers models on any timm backbone.

Importing this package registers the classes with transformers' Auto classes, and marks them so
that `save_pretrained` copies the code files and writes `auto_map` (loadable elsewhere with
`trust_remote_code=True`).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    BitImageProcessor,
)

from .configuration_barlow_twins import BarlowTwinsConfig
from .distributed import GlobalBatchNorm, convert_to_global_batchnorm
from .image_processing import create_image_processor
from .loss import BarlowTwinsLossOutput, barlow_twins_loss, cross_correlation
from .modeling_barlow_twins import (
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsForPreTrainingOutput,
    BarlowTwinsModel,
    BarlowTwinsPreTrainedModel,
    BarlowTwinsProjector,
)


__all__ = [
    "BarlowTwinsConfig",
    "BarlowTwinsForImageClassification",
    "BarlowTwinsForPreTraining",
    "BarlowTwinsForPreTrainingOutput",
    "BarlowTwinsLossOutput",
    "BarlowTwinsModel",
    "BarlowTwinsPreTrainedModel",
    "BarlowTwinsProjector",
    "GlobalBatchNorm",
    "barlow_twins_loss",
    "convert_to_global_batchnorm",
    "create_image_processor",
    "cross_correlation",
]

AutoConfig.register(BarlowTwinsConfig.model_type, BarlowTwinsConfig, exist_ok=True)
AutoModel.register(BarlowTwinsConfig, BarlowTwinsModel, exist_ok=True)
AutoModelForPreTraining.register(BarlowTwinsConfig, BarlowTwinsForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(BarlowTwinsConfig, BarlowTwinsForImageClassification, exist_ok=True)
AutoImageProcessor.register(BarlowTwinsConfig, image_processor_classes={"torchvision": BitImageProcessor}, exist_ok=True)

BarlowTwinsConfig.register_for_auto_class()
BarlowTwinsModel.register_for_auto_class("AutoModel")
BarlowTwinsForPreTraining.register_for_auto_class("AutoModelForPreTraining")
BarlowTwinsForImageClassification.register_for_auto_class("AutoModelForImageClassification")
