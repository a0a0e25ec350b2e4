"""BarlowTwinsConfig's checks and resolved values, one rule at a time (fast; `make mutate` runs these
against the configuration's mutants): preprocessing per channel, image sizes for fixed-size
backbones, the projector and loss weights, and the messages that say what to change."""

from __future__ import annotations

import pytest
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from modeling_barlow import BarlowTwinsConfig

RESNET = {"backbone": "resnet18", "projector_dims": [8]}
VIT = {"backbone": "vit_tiny_patch16_224", "projector_dims": [8]}


def test_image_mean_and_std_take_a_number_or_one_value_per_channel():
    config = BarlowTwinsConfig(**RESNET, image_mean=0.5, image_std=[1, 2, 3])
    assert config.image_mean == [0.5, 0.5, 0.5] and config.image_std == [1.0, 2.0, 3.0]
    assert all(type(v) is float for v in config.image_mean + config.image_std)
    defaults = BarlowTwinsConfig(**RESNET)
    assert defaults.image_mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and defaults.image_std == pytest.approx(IMAGENET_DEFAULT_STD)
    for value in (True, "0.5", [0.1, True, 0.2], (0.1, "a", 0.2)):
        with pytest.raises(ValueError) as error:
            BarlowTwinsConfig(**RESNET, image_mean=value)
        assert str(error.value) == f"image_mean must be a number or a list of 3 numbers (one per channel), got {value!r}."
    with pytest.raises(ValueError, match=r"^image_std must be a number or a list of 3 numbers"):
        BarlowTwinsConfig(**RESNET, image_std=[0.1, False, 0.2])
    with pytest.raises(ValueError, match=r"^image_mean and image_std need 3 values each \(one per channel\).$"):
        BarlowTwinsConfig(**RESNET, image_std=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"^image_std values must be positive"):
        BarlowTwinsConfig(**RESNET, image_std=[0.1, 0.0, 0.2])


def test_one_channel_backbones_use_the_average_statistics():
    config = BarlowTwinsConfig(**RESNET, backbone_kwargs={"in_chans": 1})
    assert config.num_channels == 1
    assert config.image_mean == pytest.approx([sum(IMAGENET_DEFAULT_MEAN) / 3])
    assert config.image_std == pytest.approx([sum(IMAGENET_DEFAULT_STD) / 3])
    with pytest.raises(ValueError, match=r"^num_channels=1 disagrees with the backbone's in_chans=3; set backbone_kwargs"):
        BarlowTwinsConfig(**RESNET, num_channels=1)


def test_crop_pct_and_interpolation_are_checked():
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    timm_data = resolve_data_config(pretrained_cfg=get_pretrained_cfg("resnet18").to_dict())  # timm's defaults
    defaults = BarlowTwinsConfig(**RESNET)
    assert (defaults.crop_pct, defaults.interpolation) == (timm_data["crop_pct"], timm_data["interpolation"])
    assert BarlowTwinsConfig(**RESNET, crop_pct=1.0).crop_pct == 1.0
    for crop_pct in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"^crop_pct must be in \(0, 1\], got {crop_pct}.$"):
            BarlowTwinsConfig(**RESNET, crop_pct=crop_pct)
    for interpolation in ("bilinear", "bicubic", "nearest"):
        assert BarlowTwinsConfig(**RESNET, interpolation=interpolation).interpolation == interpolation
    with pytest.raises(ValueError, match="^interpolation must be 'bilinear', 'bicubic' or 'nearest', got 'lanczos'.$"):
        BarlowTwinsConfig(**RESNET, interpolation="lanczos")


def test_projector_widths_and_loss_weights():
    assert BarlowTwinsConfig(backbone="resnet18", projector_dims=(1, 2)).projector_dims == [1, 2]
    for dims in ([0], [], [8, True], [8.0], "8"):
        with pytest.raises(ValueError, match=r"^projector_dims must be a non-empty list of positive integers"):
            BarlowTwinsConfig(backbone="resnet18", projector_dims=dims)
    for name in ("off_diagonal_weight", "loss_scale"):
        assert getattr(BarlowTwinsConfig(**RESNET, **{name: 0}), name) == 0
        for value in (-0.1, True, "1", float("nan")):
            with pytest.raises(ValueError) as error:
                BarlowTwinsConfig(**RESNET, **{name: value})
            assert str(error.value) == f"{name} must be a number >= 0, got {value!r}."


def test_fixed_size_backbones_get_the_image_size():
    config = BarlowTwinsConfig(**VIT, image_size=32)
    assert config.backbone_kwargs == {"img_size": 32, "dynamic_img_size": True}
    assert BarlowTwinsConfig(**VIT).image_size == 224 and BarlowTwinsConfig(**RESNET).image_size == 224
    kept = BarlowTwinsConfig(**VIT, image_size=32, backbone_kwargs={"dynamic_img_size": False})
    assert kept.backbone_kwargs["dynamic_img_size"] is False
    assert BarlowTwinsConfig(**RESNET, image_size=40).backbone_kwargs == {}  # a CNN takes any size as it is
    # timm's own img_size sets image_size (a square given as a pair too), and must agree with it.
    assert BarlowTwinsConfig(**VIT, backbone_kwargs={"img_size": [48, 48]}).image_size == 48
    for size in ([48, 32], 0, -16, "48"):
        with pytest.raises(ValueError) as error:
            BarlowTwinsConfig(**VIT, backbone_kwargs={"img_size": size})
        assert str(error.value) == f"backbone_kwargs img_size must be one positive integer (square images), got {size!r}."
    with pytest.raises(ValueError, match=r"^image_size=32 disagrees with backbone_kwargs img_size=48; give only image_size.$"):
        BarlowTwinsConfig(**VIT, backbone_kwargs={"img_size": 48}, image_size=32)
    for size in (0, True, 1.5):
        with pytest.raises(ValueError, match=rf"^image_size must be a positive integer, got {size!r}.$"):
            BarlowTwinsConfig(**RESNET, image_size=size)
    assert BarlowTwinsConfig(**RESNET, image_size=1).image_size == 1


def test_zero_init_residual_reaches_timm_only_where_it_exists():
    assert BarlowTwinsConfig(**RESNET).timm_kwargs() == {"zero_init_last": True}
    assert BarlowTwinsConfig(**RESNET, zero_init_residual=False).timm_kwargs() == {"zero_init_last": False}
    assert "zero_init_last" not in BarlowTwinsConfig(**VIT, image_size=32).timm_kwargs()


def test_unknown_backbones_and_arguments_timm_refuses_are_named():
    import difflib

    import timm

    with pytest.raises(ValueError) as error:
        BarlowTwinsConfig(backbone="resnet181", projector_dims=[8])
    message = str(error.value)
    close = difflib.get_close_matches("resnet181", timm.list_models(), n=10, cutoff=0.6)[:5]
    assert len(close) == 5 and message == (f"backbone='resnet181' is not a timm model (timm {timm.__version__}). "
                                           f"Closest timm names: {', '.join(close)}.")
    with pytest.raises(ValueError, match=r"is not a timm model \(timm .*\)\. See timm.list_models\(\) for the names.$"):
        BarlowTwinsConfig(backbone="qqqqqqqqqqqq", projector_dims=[8])
    with pytest.raises(ValueError) as error:
        BarlowTwinsConfig(**RESNET, backbone_kwargs={"no_such_argument": 1})
    assert str(error.value).startswith("timm cannot build 'resnet18' with backbone_kwargs={'no_such_argument': 1}: ")


def test_out_features_and_indices_are_taken_and_saved_stage_names_ignored():
    config = BarlowTwinsConfig(**RESNET, out_features=["layer2"])
    assert config.out_features == ["layer2"] and config.out_indices == [2]
    config = BarlowTwinsConfig(**RESNET, out_indices=[1, 3], stage_names=["a", "b"])
    assert config.out_features == ["layer1", "layer3"] and config.stage_names[:2] == ["act1", "layer1"]


def test_backbone_stages_are_checked_with_the_valid_ones_named():
    config = BarlowTwinsConfig(**RESNET, out_indices=[-5, 4])
    assert config.out_features == ["act1", "layer4"]
    stages = ("0=act1 (64 channels, stride 2), 1=layer1 (64 channels, stride 4), 2=layer2 (128 channels, stride 8), "
              "3=layer3 (256 channels, stride 16), 4=layer4 (512 channels, stride 32)")
    for indices in ([5], [-6], [True]):
        with pytest.raises(ValueError) as error:
            BarlowTwinsConfig(**RESNET, out_indices=indices)
        assert str(error.value) == (f"out_indices={indices} goes beyond the 5 stages of 'resnet18'; valid indices are "
                                    f"0 to 4 (or -5 to -1): {stages}.")
    with pytest.raises(ValueError) as error:
        BarlowTwinsConfig(**RESNET, out_features=["layer2", "layer9", "head"])
    assert str(error.value) == (f"out_features=['layer2', 'layer9', 'head']: 'layer9', 'head' is not a stage of "
                                f"'resnet18'; its stages are {stages}.")


def test_the_small_image_stem_divides_the_strides():
    import timm

    reductions = [info["reduction"] for info in timm.create_model("resnet18", features_only=True).feature_info]
    assert reductions == [2, 4, 8, 16, 32]
    config = BarlowTwinsConfig(**RESNET, small_image_stem=True, image_size=32)
    # No stride-2 stem convolution and no max-pool: the stem keeps full size, the rest shrink 4x.
    strides = [stride for _, _, stride in config.feature_stages()]
    assert strides == [1] + [r // 4 for r in reductions[1:]] == [1, 1, 2, 4, 8] and all(type(s) is int for s in strides)


def test_fixed_size_backbones_check_the_size_and_one_without_img_size_keeps_its_own(monkeypatch):
    with pytest.raises(ValueError, match="^image_size=30 is not a multiple of the patch size 16 of 'vit_tiny_patch16_224'"):
        BarlowTwinsConfig(**VIT, image_size=30)
    import modeling_barlow.configuration_barlow_twins as configuration

    # As timm builds some models: for one input size, with no img_size argument.
    monkeypatch.setattr(configuration, "_constructor_arguments", lambda name: frozenset({"num_classes"}))
    assert BarlowTwinsConfig(**VIT, image_size=224).backbone_kwargs == {}
    with pytest.raises(ValueError) as error:
        BarlowTwinsConfig(**VIT, image_size=32)
    assert str(error.value).startswith("'vit_tiny_patch16_224' takes 224 px inputs only: timm builds it for one input "
                                       "size and has no img_size argument for it. Use image_size=224 (--image_size 224)")
