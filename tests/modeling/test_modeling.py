"""The three model classes: shapes, initialisation, per-view BatchNorm, freezing, save and load."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsModel,
    barlow_twins_loss,
)

from ..conftest import TINY_RESNET


def test_backbone_keeps_timms_initialisation(tiny_config):
    torch.manual_seed(7)
    expected = timm.create_model("resnet18", num_classes=0, channels=[16, 32, 64, 128], zero_init_last=True)
    torch.manual_seed(7)
    model = BarlowTwinsModel(tiny_config)
    got = model.backbone.state_dict()
    assert got.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, msg=key)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_reaches_timm(zero_init):
    config = BarlowTwinsConfig(**TINY_RESNET, zero_init_residual=zero_init)
    last_norms = [block.bn2.weight for stage in ("layer1", "layer4") for block in getattr(BarlowTwinsModel(config).backbone, stage)]
    assert all(bool((w == 0).all()) == zero_init for w in last_norms)


def test_projector_matches_the_release_layout(tiny_config):
    config = BarlowTwinsConfig(**{**TINY_RESNET, "projector_dims": [48, 40, 32]})
    projector = BarlowTwinsForPreTraining(config).projector
    kinds = [type(m) for m in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [projector[i].weight.shape for i in (0, 3, 6)] == [(48, 128), (40, 48), (32, 40)]
    assert all(projector[i].bias is None for i in (0, 3, 6))


def test_encoder_outputs(tiny_config):
    model = BarlowTwinsModel(tiny_config).eval()
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    assert out.last_hidden_state.shape == (3, 128, 2, 2)
    assert out.pooler_output.shape == (3, 128)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean((2, 3)))
    as_tuple = model(x, return_dict=False)
    torch.testing.assert_close(as_tuple[1], out.pooler_output)


def test_pretraining_runs_each_view_through_the_backbone_on_its_own(tiny_config):
    model = BarlowTwinsForPreTraining(tiny_config).train()
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32) * 2 + 1
    out = model(x1, x2)

    # The same network, rebuilt by hand from timm and the projector's weights, per view.
    encoder = model.barlow_twins.backbone
    expected_1 = model.projector(encoder.forward_head(encoder.forward_features(x1), pre_logits=True))
    expected_2 = model.projector(encoder.forward_head(encoder.forward_features(x2), pre_logits=True))
    torch.testing.assert_close(out.projections, expected_1)
    torch.testing.assert_close(out.projections_2, expected_2)
    joint = model.projector(model.barlow_twins(torch.cat([x1, x2])).pooler_output)
    assert not torch.allclose(joint[:6], expected_1, atol=1e-3)  # mixing the views' statistics differs

    reference = barlow_twins_loss(expected_1, expected_2, tiny_config.off_diagonal_weight)
    torch.testing.assert_close(out.loss, reference.loss)
    torch.testing.assert_close(out.on_diagonal_loss, reference.on_diagonal)
    out.loss.backward()
    assert model.barlow_twins.backbone.conv1.weight.grad.abs().sum() > 0


def test_pretraining_without_second_view_has_no_loss(tiny_config):
    out = BarlowTwinsForPreTraining(tiny_config).eval()(torch.randn(2, 3, 32, 32))
    assert out.loss is None and out.projections_2 is None
    assert out.projections.shape == (2, 64)


def test_base_model_is_the_encoder(tiny_config):
    model = BarlowTwinsForPreTraining(tiny_config)
    assert isinstance(model.base_model, BarlowTwinsModel)


def test_classification_loss_is_cross_entropy(tiny_config):
    tiny_config.num_labels = 5
    model = BarlowTwinsForImageClassification(tiny_config).eval()
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 4, 2, 2])
    out = model(x, labels=labels)
    assert out.logits.shape == (4, 5)
    logits = model.classifier(model.barlow_twins(x).pooler_output)
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(out.loss, expected)
    assert model.classifier.bias.abs().sum() == 0
    assert 0.005 < model.classifier.weight.std() < 0.015  # the probe protocol's N(0, 0.01)


def test_freeze_backbone_keeps_batchnorm_in_eval_mode(tiny_config):
    tiny_config.num_labels = 3
    model = BarlowTwinsForImageClassification(tiny_config).freeze_backbone().train()
    assert model.training and model.classifier.training
    assert not any(m.training for m in model.barlow_twins.modules())
    running_mean = model.barlow_twins.backbone.bn1.running_mean.clone()
    weights = model.barlow_twins.backbone.conv1.weight.clone()

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(8, 3, 32, 32) * 3, labels=torch.randint(0, 3, (8,))).loss.backward()
    optimizer.step()
    torch.testing.assert_close(model.barlow_twins.backbone.bn1.running_mean, running_mean)
    torch.testing.assert_close(model.barlow_twins.backbone.conv1.weight, weights)
    assert model.classifier.weight.grad is not None

    model.freeze_backbone(False).train()
    assert model.barlow_twins.backbone.bn1.training
    assert all(p.requires_grad for p in model.barlow_twins.parameters())


def test_small_image_stem_keeps_resolution_at_32px():
    plain = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET, image_size=32)).eval()
    small = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET, image_size=32, small_image_stem=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert plain(x).last_hidden_state.shape[-2:] == (1, 1)
    assert small(x).last_hidden_state.shape[-2:] == (4, 4)  # 32 px / 8: only the stages downsample
    conv = small.backbone.conv1
    assert (conv.kernel_size, conv.stride, conv.out_channels) == ((3, 3), (1, 1), 64)
    assert isinstance(small.backbone.maxpool, nn.Identity)


def test_vit_backbone():
    config = BarlowTwinsConfig(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
        projector_dims=[32, 32],
        image_size=32,
    )
    model = BarlowTwinsForPreTraining(config)
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert out.pooler_output.shape == (4, 192)
    assert out.projections.shape == (4, 32)
    assert model.barlow_twins(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 17, 192)  # 16 patches + CLS
    out.loss.backward()


@pytest.mark.parametrize("cls", [BarlowTwinsModel, BarlowTwinsForPreTraining, BarlowTwinsForImageClassification])
def test_save_and_load_round_trip(tmp_path, tiny_config, cls):
    tiny_config.num_labels = 4
    model = cls(tiny_config)
    # Move BatchNorm statistics away from their defaults so their saving is tested too.
    model.train()(torch.randn(8, 3, 32, 32) * 2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = cls.from_pretrained(tmp_path).eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected, got = model(x), loaded(x)
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_auto_classes_load_a_pretraining_folder(tmp_path, tiny_config):
    pretrained = BarlowTwinsForPreTraining(tiny_config).eval()
    pretrained.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BarlowTwinsConfig)
    assert isinstance(AutoModelForPreTraining.from_pretrained(tmp_path), BarlowTwinsForPreTraining)

    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(encoder, BarlowTwinsModel)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(x).pooler_output, pretrained.barlow_twins(x).pooler_output)

    classifier, info = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=7, output_loading_info=True)
    assert isinstance(classifier, BarlowTwinsForImageClassification)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert classifier.classifier.out_features == 7
    torch.testing.assert_close(classifier.eval().barlow_twins(x).pooler_output, pretrained.barlow_twins(x).pooler_output)


def test_classifier_loads_an_encoder_folder(tmp_path, tiny_config):
    encoder = BarlowTwinsModel(tiny_config).eval()
    encoder.save_pretrained(tmp_path)
    classifier, info = BarlowTwinsForImageClassification.from_pretrained(tmp_path, num_labels=2, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(classifier.eval().barlow_twins(x).pooler_output, encoder(x).pooler_output)
