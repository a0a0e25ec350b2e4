"""`modeling_barlow.timm_network` on tiny networks, each against a direct computation or timm itself:
the small-image stem as a 3x3/1 convolution with padding 1 (torch's conv2d), the builder's own
refusal of stems it cannot swap, the random-state mark on networks with only parameters or only
buffers, stage maps that stop after the last wanted stage, and the message for networks without
forward_intermediates. Fast enough for mutation testing (benchmarks/mutation.py)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from modeling_barlow import BarlowTwinsConfig
from modeling_barlow.timm_network import (
    create_timm_network,
    forward_stages,
    mark_drawn_by_timm,
    stage_feature_maps,
    was_drawn_by_timm_just_now,
)


CHANNELS = {"channels": [8, 8, 16, 16]}


def test_small_image_stem_is_a_3x3_stride_1_convolution_padded_to_keep_the_size():
    network = create_timm_network(BarlowTwinsConfig(backbone="resnet18", backbone_kwargs=CHANNELS,
                                                    projector_dims=[8], small_image_stem=True)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert network.conv1.bias is None
    torch.testing.assert_close(network.conv1(x), nn.functional.conv2d(x, network.conv1.weight, stride=1, padding=1))
    _, maps = forward_stages(network, x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (16, 16), (8, 8), (4, 4), (2, 2)]  # no max-pool


@pytest.mark.parametrize("backbone,kwargs,stem", [
    ("resnet18d", CHANNELS, "Sequential"),  # a deep stem: three convolutions
    ("convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}, "NoneType"),  # no conv1 at all
])
def test_the_builder_refuses_stems_it_cannot_swap(backbone, kwargs, stem):
    # The config refuses these first; the builder checks again, for configs changed after validation.
    config = BarlowTwinsConfig(backbone=backbone, backbone_kwargs=kwargs, projector_dims=[8])
    config.small_image_stem = True
    with pytest.raises(ValueError) as error:
        create_timm_network(config)
    assert str(error.value) == (f"small_image_stem needs a single-convolution stem, but {backbone!r} has a deep stem "
                                f"({stem}). Use a plain ResNet such as resnet18 or resnet50.")


class _OnlyBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(3))


@pytest.mark.parametrize("make", [lambda: nn.Linear(2, 2), _OnlyBuffers], ids=["only parameters", "only buffers"])
def test_the_mark_holds_until_something_draws(make):
    network = make()
    mark_drawn_by_timm(network)
    assert was_drawn_by_timm_just_now(network)
    assert not was_drawn_by_timm_just_now(network)  # reading clears it
    mark_drawn_by_timm(network)
    torch.rand(1)  # a draw moves the CPU's random state on
    assert not was_drawn_by_timm_just_now(network)


def test_a_network_without_tensors_is_not_marked():
    network = nn.Identity()
    mark_drawn_by_timm(network)
    assert not was_drawn_by_timm_just_now(network)


def test_stage_maps_stop_after_the_last_wanted_stage():
    network = timm.create_model("resnet18", pretrained=False, num_classes=0, **CHANNELS).eval()
    ran = []
    network.layer3.register_forward_hook(lambda *_: ran.append("layer3"))
    network.layer4.register_forward_hook(lambda *_: ran.append("layer4"))
    x = torch.randn(1, 3, 32, 32)
    maps = stage_feature_maps(network, x, [1, 2])
    assert ran == []
    expected = network.layer2(network.layer1(network.maxpool(network.act1(network.bn1(network.conv1(x))))))
    torch.testing.assert_close(maps[1], expected)
    assert [tuple(m.shape) for m in maps] == [(1, 8, 8, 8), (1, 8, 4, 4)]


def test_a_network_without_forward_intermediates_is_refused_with_why():
    class Plain(nn.Module):
        def forward_features(self, x):
            return x

    with pytest.raises(ValueError) as error:
        forward_stages(Plain(), torch.zeros(1, 3, 4, 4))
    assert str(error.value) == (
        f"timm's Plain has no forward_intermediates (timm {timm.__version__}), so its hidden states and stage "
        "feature maps cannot be returned. Pick another backbone or update timm."
    )
