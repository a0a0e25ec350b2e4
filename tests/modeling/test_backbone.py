"""BarlowTwinsBackbone: transformers' backbone API (out_features, out_indices, channels,
feature_maps) over timm's stages, compared with timm's own feature extractor holding the same
weights, and loaded through AutoBackbone from every kind of saved folder."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import AutoBackbone

from modeling_barlow import (
    BarlowTwinsBackbone,
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    BarlowTwinsForPreTraining,
    BarlowTwinsModel,
)

from ..conftest import TINY_RESNET
from .test_model_contract import TINY_CONVNEXT, TINY_VIT, _randomise_batchnorms


def _timm_features_only(spec: dict, out_indices: list[int], weights: dict) -> torch.nn.Module:
    """timm's own multi-scale extractor (FeatureListNet) for the same architecture and weights."""
    kwargs = dict(spec.get("backbone_kwargs", {}))
    extractor = timm.create_model(spec["backbone"], pretrained=False, features_only=True, out_indices=out_indices, **kwargs)
    # It flattens top-level sequences: ConvNeXt's "stages.0.blocks..." is its "stages_0.blocks...".
    renamed = {}
    for key in extractor.state_dict():
        head, _, rest = key.partition(".")
        name, _, index = head.rpartition("_")
        renamed[key] = weights[key] if key in weights else weights[f"{name}.{index}.{rest}"]
    extractor.load_state_dict(renamed, strict=True)
    return extractor.eval()


@pytest.mark.parametrize(
    "spec,out_indices,channels",
    [(TINY_RESNET, [0, 1, 2, 3, 4], [64, 16, 32, 64, 128]), (TINY_RESNET, [1, 3], [16, 64]),
     (TINY_CONVNEXT, [0, 1, 2, 3], [8, 16, 24, 32]), (TINY_CONVNEXT, [2], [24])],
    ids=["resnet-all", "resnet-two", "convnext-all", "convnext-one"],
)
def test_feature_maps_are_timms_features(spec, out_indices, channels):
    backbone = BarlowTwinsBackbone(BarlowTwinsConfig(**spec, out_indices=out_indices)).eval()
    _randomise_batchnorms(backbone)
    network = backbone.barlow_twins.backbone
    assert backbone.channels == channels
    assert backbone.out_features == [backbone.stage_names[i] for i in out_indices]
    extractor = _timm_features_only(spec, out_indices, network.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, expected = backbone(x).feature_maps, extractor(x)
    assert len(got) == len(expected) == len(out_indices)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_vit_feature_maps_are_block_tokens_as_maps():
    backbone = BarlowTwinsBackbone(BarlowTwinsConfig(**TINY_VIT, out_indices=[0, 2])).eval()
    vit = backbone.barlow_twins.backbone
    assert backbone.stage_names == ["blocks.0", "blocks.1", "blocks.2"]
    assert backbone.channels == [192, 192]
    captured = {}
    for i in (0, 2):
        vit.blocks[i].register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = backbone(x).feature_maps
    assert len(maps) == 2  # zip alone would pass with the last map dropped
    for index, got in zip((0, 2), maps):
        expected = captured[index][:, vit.num_prefix_tokens:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, expected)


def test_default_is_the_last_stage_and_hidden_states_are_all_stages():
    backbone = BarlowTwinsBackbone(BarlowTwinsConfig(**TINY_RESNET)).eval()
    assert backbone.out_features == ["layer4"] and backbone.out_indices == [4] and backbone.channels == [128]
    x = torch.randn(1, 3, 64, 64)
    out = backbone(x, output_hidden_states=True)
    assert len(out.hidden_states) == 5 and out.hidden_states[-1] is out.feature_maps[0]
    assert backbone(x).hidden_states is None
    torch.testing.assert_close(out.feature_maps[0], backbone.barlow_twins(x).last_hidden_state)


@pytest.mark.parametrize("kwargs", [{"out_indices": [1, 5]}, {"out_indices": [-6]}, {"out_features": ["layer1", "layer9"]}])
def test_stages_beyond_the_backbone_list_the_valid_ones(kwargs):
    with pytest.raises(ValueError) as error:
        BarlowTwinsConfig(**TINY_RESNET, **kwargs)
    message = str(error.value)
    assert "0=act1 (64 channels, stride 2), 1=layer1 (16 channels, stride 4)" in message
    assert "4=layer4 (128 channels, stride 32)" in message
    if "out_indices" in kwargs:
        assert "valid indices are 0 to 4 (or -5 to -1)" in message


@pytest.mark.parametrize("saved", [BarlowTwinsForPreTraining, BarlowTwinsModel, BarlowTwinsForImageClassification])
def test_auto_backbone_loads_every_kind_of_folder(tmp_path, saved):
    config = BarlowTwinsConfig(**TINY_RESNET, num_labels=3)
    model = saved(config).eval()
    _randomise_batchnorms(model)
    model.save_pretrained(tmp_path)
    backbone, info = AutoBackbone.from_pretrained(tmp_path, out_indices=[2, 4], output_loading_info=True)
    assert isinstance(backbone, BarlowTwinsBackbone)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    network = model.base_model.backbone if saved is not BarlowTwinsModel else model.backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = network.forward_intermediates(x, indices=[2, 4], intermediates_only=True)
        maps = backbone.eval()(x).feature_maps
        assert len(maps) == len(expected) == 2  # zip alone would pass with the last map dropped
        for got, want in zip(maps, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="valid indices are 0 to 4"):
        AutoBackbone.from_pretrained(tmp_path, out_indices=[7])


def test_backbone_round_trip_keeps_its_stages(tmp_path):
    backbone = BarlowTwinsBackbone(BarlowTwinsConfig(**TINY_RESNET, out_features=["layer2", "layer3"]))
    backbone.save_pretrained(tmp_path)
    loaded = AutoBackbone.from_pretrained(tmp_path)
    assert loaded.out_features == ["layer2", "layer3"] and loaded.channels == [32, 64]
    assert isinstance(AutoBackbone.from_config(BarlowTwinsConfig(**TINY_RESNET)), BarlowTwinsBackbone)


def test_a_one_channel_backbone_takes_rgb_as_its_luminance():
    # Image processors and pipelines hand over RGB; the encoder turns it into PIL's "L" luminance.
    spec = {**TINY_RESNET, "backbone_kwargs": {**TINY_RESNET.get("backbone_kwargs", {}), "in_chans": 1}}
    backbone = BarlowTwinsBackbone(BarlowTwinsConfig(**spec, out_indices=[1, 2])).eval()
    rgb = torch.rand(2, 3, 32, 32)
    luminance = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    with torch.no_grad():
        from_rgb, from_grey = backbone(rgb).feature_maps, backbone(luminance).feature_maps
    assert [m.shape[1] for m in from_rgb] == backbone.channels
    for a, b in zip(from_rgb, from_grey):
        torch.testing.assert_close(a, b)
