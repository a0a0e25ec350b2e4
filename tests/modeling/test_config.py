"""BarlowTwinsConfig: resolved preprocessing, round trips, and every documented error."""

from __future__ import annotations

import pytest
from timm.data import resolve_model_data_config
import timm

from modeling_barlow import BarlowTwinsConfig


def test_defaults_are_the_papers():
    config = BarlowTwinsConfig()
    assert config.backbone == "resnet50"
    assert config.projector_dims == [8192, 8192, 8192]
    assert config.off_diagonal_weight == 0.0051
    assert config.loss_scale == 1.0
    assert config.zero_init_residual is True and config.small_image_stem is False


@pytest.mark.parametrize("name", ["resnet50", "vit_small_patch16_224", "convnext_tiny"])
def test_preprocessing_resolved_from_timms_data_config(name):
    # Independent source: timm's own resolution on the instantiated network.
    expected = resolve_model_data_config(timm.create_model(name, pretrained=False, num_classes=0))
    config = BarlowTwinsConfig(backbone=name)
    assert config.image_size == expected["input_size"][-1]
    assert config.num_channels == expected["input_size"][0]
    assert tuple(config.image_mean) == tuple(expected["mean"])
    assert tuple(config.image_std) == tuple(expected["std"])
    assert config.crop_pct == expected["crop_pct"]
    assert config.interpolation == expected["interpolation"]


def test_explicit_preprocessing_wins():
    config = BarlowTwinsConfig(backbone="resnet18", image_size=32, image_mean=[0.5] * 3, image_std=[0.25] * 3, crop_pct=1.0)
    assert (config.image_size, config.image_mean, config.image_std, config.crop_pct) == (32, [0.5] * 3, [0.25] * 3, 1.0)


def test_grayscale_backbone_gets_one_channel_statistics():
    config = BarlowTwinsConfig(backbone="resnet18", backbone_kwargs={"in_chans": 1})
    assert config.num_channels == 1 and len(config.image_mean) == len(config.image_std) == 1


def test_round_trip_through_json(tmp_path):
    config = BarlowTwinsConfig(backbone="resnet18", backbone_kwargs={"drop_path_rate": 0.1}, projector_dims=[32, 16],
                               off_diagonal_weight=0.01, loss_scale=0.024, small_image_stem=True, image_size=32)
    config.save_pretrained(tmp_path)
    loaded = BarlowTwinsConfig.from_pretrained(tmp_path)
    for field in ("backbone", "backbone_kwargs", "projector_dims", "off_diagonal_weight", "loss_scale",
                  "small_image_stem", "image_size", "image_mean", "crop_pct", "interpolation"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert "pretrained_cfg" not in (tmp_path / "config.json").read_text()


BAD_CONFIGS = [
    ({"backbone": "resnt50"}, "Closest timm names: resnet50"),
    ({"backbone": "not_a_model_at_all_xyz"}, "not a timm model"),
    ({"backbone_kwargs": {"num_classes": 10}}, "num_classes"),
    ({"backbone_kwargs": {"pretrained": True}}, "pretrained"),
    ({"backbone_kwargs": {"no_such_argument": 1}}, "cannot build"),
    ({"backbone": "vit_tiny_patch16_224", "small_image_stem": True}, "ResNet family"),
    ({"backbone": "resnet50d", "small_image_stem": True}, "deep stem"),
    ({"projector_dims": []}, "projector_dims"),
    ({"projector_dims": [512, 0]}, "projector_dims"),
    ({"projector_dims": [512, -3]}, "projector_dims"),
    ({"projector_dims": [512.5]}, "projector_dims"),
    ({"off_diagonal_weight": -0.1}, "off_diagonal_weight"),
    ({"loss_scale": -1.0}, "loss_scale"),
    ({"off_diagonal_weight": float("nan")}, "off_diagonal_weight"),
    ({"image_size": 0}, "image_size"),
    ({"num_channels": 1}, "in_chans"),
    ({"image_std": [0.0, 1.0, 1.0]}, "image_std"),
    ({"image_mean": [0.5]}, "image_mean"),
    ({"crop_pct": 1.5}, "crop_pct"),
    ({"interpolation": "lanczos9"}, "interpolation"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_invalid_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BarlowTwinsConfig(**kwargs)
