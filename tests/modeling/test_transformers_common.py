"""transformers' own common tests, for the installed transformers version, run on our models the way
transformers' tests/models/*/test_modeling_*.py run them on its own (tiny ResNets: default and
small-image stem).

Tests that do not apply are skipped with the reason transformers gives for its own timm-based models
(tests/models/timm_wrapper and timm_backbone). Everything else, initialisation on the meta device
and of missing buffers included, runs as transformers runs it.
"""

from __future__ import annotations

import unittest
from unittest import mock

import timm
import torch

from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from modeling_barlow import (
    BarlowTwinsBackbone,
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsModel,
    create_image_processor,
)

from . import transformers_sdist


common = transformers_sdist.load("test_modeling_common")
ConfigTester = transformers_sdist.load("test_configuration_common").ConfigTester
PipelineTesterMixin = transformers_sdist.load("test_pipeline_mixin").PipelineTesterMixin
BackboneTesterMixin = transformers_sdist.load("test_backbone_common").BackboneTesterMixin
image_processing = transformers_sdist.load("test_image_processing_common")

GRADIENT_CHECKPOINTING_SKIP = (
    "timm-based models checkpoint through timm (set_grad_checkpointing), with no GradientCheckpointingLayer"
)
# Narrow ResNet-18 stages keep each of the ~100 common tests to a fraction of a second.
TINY = {"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 8, 16, 16]}, "projector_dims": [16, 16]}


class BarlowTwinsModelTester:
    def __init__(self, parent, small_image_stem: bool = False, batch_size: int = 3, image_size: int = 32):
        self.parent = parent
        self.small_image_stem = small_image_stem
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = 3
        self.num_labels = 3
        self.is_training = True

    def get_config(self) -> BarlowTwinsConfig:
        return BarlowTwinsConfig(
            **TINY, small_image_stem=self.small_image_stem, image_size=self.image_size, num_labels=self.num_labels,
            out_indices=[1, 2, 3],
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = common.floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class _TimmBasedSkips:
    """The common tests that don't fit a model on a timm network, skipped with transformers' reasons."""

    has_attentions = False
    test_resize_embeddings = False
    # Our `_init_weights` covers every tensor, so transformers' date-based exemption is switched off.
    test_can_init_all_missing_weights_before_2023 = True

    @unittest.skip(reason="TimmWrapper models doesn't have inputs_embeds")
    def test_model_get_set_embeddings(self):
        pass

    # timm checkpoints its own blocks (set_grad_checkpointing), as under transformers' TimmWrapperModel;
    # neither holds transformers' GradientCheckpointingLayer, which these tests look for. Our own
    # test_model_contract checks that checkpointing recomputes and gives the same gradients.
    @unittest.skip(reason=GRADIENT_CHECKPOINTING_SKIP)
    def test_gradient_checkpointing_enable_disable(self):
        pass

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        self.skipTest(reason=GRADIENT_CHECKPOINTING_SKIP)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # transformers adds labels by its auto mappings, which remote-code classes are not in: the
        # classifier's are class ids (as for transformers' image classifiers); pretraining's loss
        # needs the second view.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is BarlowTwinsForImageClassification:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        if return_labels and model_class is BarlowTwinsForPreTraining:
            inputs_dict["pixel_values_2"] = inputs_dict["pixel_values"].flip(-1)  # a mirrored view
        return inputs_dict

    def _heads_only(self):
        # transformers leaves base models and backbones (no loss) out of its training tests by those
        # same auto mappings; here by class.
        heads = tuple(c for c in self.all_model_classes if c in (BarlowTwinsForPreTraining, BarlowTwinsForImageClassification))
        return mock.patch.object(self, "all_model_classes", heads)

    def test_training(self):
        with self._heads_only():
            super().test_training()



class BarlowTwinsModelTest(_TimmBasedSkips, common.ModelTesterMixin, PipelineTesterMixin, unittest.TestCase):
    all_model_classes = (BarlowTwinsModel, BarlowTwinsForPreTraining, BarlowTwinsForImageClassification)
    pipeline_model_mapping = {
        "image-feature-extraction": BarlowTwinsModel,
        "image-classification": BarlowTwinsForImageClassification,
    }
    small_image_stem = False

    def setUp(self):
        self.model_tester = BarlowTwinsModelTester(self, small_image_stem=self.small_image_stem)
        self.config_tester = ConfigTester(
            self, config_class=BarlowTwinsConfig, has_text_modality=False, common_properties=["num_channels"], **TINY
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_hidden_states_output(self):
        # As transformers' TimmWrapper test checks it: one map per stage, at the resolution of the stages
        # of the same network built by timm itself.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        reference = timm.create_model("resnet18", num_classes=0, **TINY["backbone_kwargs"])
        if self.small_image_stem:  # a stride-1 stem and no max-pool: every stage 4x larger
            reductions = [1] + [info["reduction"] // 4 for info in reference.feature_info[1:]]
        else:
            reductions = [info["reduction"] for info in reference.feature_info]
        size = self.model_tester.image_size
        expected = [[info["num_chs"], size // r, size // r] for info, r in zip(reference.feature_info, reductions)]
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with torch.no_grad():
                outputs = model(**inputs_dict, output_hidden_states=True)
            self.assertListEqual([list(h.shape[1:]) for h in outputs.hidden_states], expected)


class BarlowTwinsSmallImageStemModelTest(BarlowTwinsModelTest):
    small_image_stem = True


class BarlowTwinsBackboneTest(_TimmBasedSkips, common.ModelTesterMixin, BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (BarlowTwinsBackbone,)
    config_class = BarlowTwinsConfig

    def setUp(self):
        self.model_tester = BarlowTwinsModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=BarlowTwinsConfig, has_text_modality=False, common_properties=["num_channels"], **TINY
        )

    # As for transformers' TimmBackbone: stage names are timm's module names, not stem/stage1/..., so the
    # config is checked by the common ConfigTester instead.
    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="TimmBackbone doesn't have num_hidden_layers attribute")
    def test_hidden_states_output(self):
        pass

    # transformers' TimmBackbone test replaces this one with its own (feature maps are a tuple).
    @unittest.skip(reason="TimmWrapper doesn't support this.")
    def test_retain_grad_hidden_states_attentions(self):
        pass


class BarlowTwinsImageProcessingTester(image_processing.ImageProcessingTester):
    """Our preprocessing is transformers' Bit image processor set up by `create_image_processor`: its
    classes (both backends) tested with exactly those settings, for a 32 px model."""

    def __init__(self, parent, **kwargs):
        settings = create_image_processor(BarlowTwinsConfig(**TINY, image_size=32)).to_dict()
        settings.pop("image_processor_type")
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}  # as JSON gives them back
        super().__init__(parent, **{**settings, **kwargs})

    def _get_image_processing_classes(self):
        # transformers finds them by the test file's folder (tests/models/bit); ours is tests/modeling.
        return {backend: get_image_processor_class_from_name(name) for backend, name in IMAGE_PROCESSOR_MAPPING_NAMES["bit"].items()}


class BarlowTwinsImageProcessingTest(image_processing.ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = BarlowTwinsImageProcessingTester
