"""Vision Transformers as backbones: the input size reaches timm, bad sizes are refused with the
sizes that work, and the pooling is timm's (class token or mean) wherever features are taken.

References are independent of our code: networks built by timm itself with the same arguments,
and the pooling computed by hand from the token sequence."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import register_model

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsModel, create_image_processor
from training.evaluation.features import extract_features

# A small ViT (2 blocks of width 32): seconds on a CPU, yet every part of a ViT-Tiny.
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize(
    "backbone, extra",
    [
        ("vit_tiny_patch16_224", {"patch_size": 4}),
        ("deit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),  # its class passes img_size on in **kwargs
        ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1)}),
    ],
)
def test_image_size_reaches_timm_and_matches_timms_own_network(backbone, extra):
    kwargs = {**(TINY_VIT if "swin" not in backbone else {}), **extra}
    config = BarlowTwinsConfig(backbone=backbone, backbone_kwargs=kwargs, image_size=32, projector_dims=[16])
    assert config.backbone_kwargs["img_size"] == 32
    ours = BarlowTwinsModel(config).eval()
    # The same network built by timm directly for 32 px inputs: same parameters, same features.
    reference = timm.create_model(backbone, pretrained=False, num_classes=0, img_size=32, **kwargs).eval()
    assert {k: v.shape for k, v in ours.backbone.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    reference.load_state_dict(ours.backbone.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels).pooler_output, reference(pixels))


def test_saved_config_and_image_processor_agree_on_the_size(tmp_path):
    config = BarlowTwinsConfig(backbone="vit_tiny_patch16_224", backbone_kwargs={**TINY_VIT, "patch_size": 4},
                               image_size=32, projector_dims=[16])
    config.save_pretrained(tmp_path)
    loaded = BarlowTwinsConfig.from_pretrained(tmp_path)
    assert loaded.image_size == loaded.backbone_kwargs["img_size"] == 32
    assert create_image_processor(loaded).crop_size == {"height": 32, "width": 32}
    model = BarlowTwinsModel(loaded)
    assert tuple(model.backbone.patch_embed.img_size) == (32, 32)
    assert model.backbone.pos_embed.shape[1] == 1 + (32 // 4) ** 2  # class token + an 8 x 8 grid


def test_img_size_in_backbone_kwargs_sets_image_size():
    config = BarlowTwinsConfig(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 48}, projector_dims=[16])
    assert config.image_size == 48
    with pytest.raises(ValueError, match="disagrees with backbone_kwargs img_size=48"):
        BarlowTwinsConfig(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 48}, image_size=32)


def test_dynamic_img_size_lets_the_encoder_take_other_sizes():
    config = BarlowTwinsConfig(backbone="vit_tiny_patch16_224", backbone_kwargs={**TINY_VIT, "patch_size": 4},
                               image_size=16, projector_dims=[16])
    assert config.backbone_kwargs["dynamic_img_size"] is True
    model = BarlowTwinsModel(config).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 1 + 8 * 8, 32)
    # Switched off by the user, the size is fixed again and timm refuses others.
    fixed = BarlowTwinsModel(BarlowTwinsConfig(backbone="vit_tiny_patch16_224", image_size=16, projector_dims=[16],
                                               backbone_kwargs={**TINY_VIT, "patch_size": 4, "dynamic_img_size": False}))
    with pytest.raises(AssertionError):
        fixed(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 30}, "image_size=30 is not a multiple of the patch size 16 of 'vit_tiny_patch16_224'. Use image_size 16 or 32"),
        ({"image_size": 30, "backbone_kwargs": {"patch_size": 4}}, "Use image_size 28 or 32"),
        ({"image_size": 32, "small_image_stem": True}, "applies to timm's ResNet family"),
    ],
)
def test_impossible_vit_settings_say_what_works(kwargs, message):
    with pytest.raises(ValueError) as error:
        BarlowTwinsConfig(backbone="vit_tiny_patch16_224", projector_dims=[16], **kwargs)
    assert message in str(error.value)


class _FixedSizeNet(torch.nn.Module):
    """A network built for 40 px inputs only, with no img_size argument (as some timm models are)."""

    def __init__(self, num_classes: int = 0, in_chans: int = 3, **kwargs):
        super().__init__()
        self.num_features = 8
        self.proj = torch.nn.Linear(in_chans * 40 * 40, 8)

    def forward_features(self, x):
        return self.proj(x.flatten(1))

    def forward_head(self, x, pre_logits: bool = False):
        return x


default_cfgs = {"barlow_test_fixed_size_net": {"input_size": (3, 40, 40), "fixed_input_size": True}}


@register_model
def barlow_test_fixed_size_net(pretrained: bool = False, **kwargs) -> _FixedSizeNet:
    return _FixedSizeNet(**kwargs)


def test_a_backbone_whose_size_cannot_change_says_the_size_it_takes():
    # Registered with timm above (fixed input size, no img_size argument).
    assert timm.get_pretrained_cfg("barlow_test_fixed_size_net").fixed_input_size
    assert BarlowTwinsConfig(backbone="barlow_test_fixed_size_net", projector_dims=[8]).image_size == 40
    with pytest.raises(ValueError, match=r"takes 40 px inputs only.*image_size=40"):
        BarlowTwinsConfig(backbone="barlow_test_fixed_size_net", image_size=32, projector_dims=[8])


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_pooling_follows_timms_global_pool_in_features(global_pool):
    config = BarlowTwinsConfig(backbone="vit_tiny_patch16_224", image_size=16, projector_dims=[16],
                               backbone_kwargs={**TINY_VIT, "patch_size": 4, "global_pool": global_pool})
    model = BarlowTwinsModel(config).eval()
    backbone = model.backbone
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = model(pixels).last_hidden_state  # (B, 1 + 16, D): class token first
        # By hand: the class token, or the mean of the patch tokens, then timm's fc_norm (an
        # identity for the class token, whose norm came before it).
        pooled = tokens[:, 0] if global_pool == "token" else tokens[:, backbone.num_prefix_tokens:].mean(1)
        expected = backbone.fc_norm(pooled)
        features, _ = extract_features(model, [{"pixel_values": pixels, "labels": torch.zeros(3)}])
    assert tokens.shape == (3, 17, 32)
    torch.testing.assert_close(features, expected)
    if global_pool == "avg":  # the two poolings differ, so the test above tells them apart
        assert not torch.allclose(expected, backbone.fc_norm(tokens[:, 0]), atol=1e-3)
