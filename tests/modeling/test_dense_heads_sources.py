"""What `modeling_barlow.dense_heads` reads and passes on, in process: encoder paths that are not
there, a hub id resolved from the HF cache, timm-format exports of classifiers (their head left
out, a ConvNeXt's head norm kept), the pyramid's default stages, and the settings that reach DETR's
and UperNet's configs. References: timm's own networks and state dicts, the stage lists written out
here. Fast enough for mutation testing (benchmarks/mutation.py); test_dense_heads.py trains and
reloads whole models."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from modeling_barlow import (
    BarlowTwinsBackbone,
    BarlowTwinsConfig,
    BarlowTwinsForPreTraining,
    barlow_detr_for_object_detection,
    barlow_upernet_for_semantic_segmentation,
    default_pyramid_indices,
    encoder_backbone_config,
    load_encoder_into_backbones,
)

from ..conftest import TINY_RESNET


TINY_DETR = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 16, "decoder_ffn_dim": 16,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 4}
LABELS = {0: "digit", 1: "shirt", 2: "shoe"}
CONVNEXT = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}


@pytest.mark.parametrize("name", ["./nowhere", "/nowhere-at-all", "~/nowhere", "a/b/c"])
def test_a_path_that_is_not_there_is_not_looked_up_on_the_hub(name):
    with pytest.raises(FileNotFoundError) as error:
        encoder_backbone_config(name)
    assert str(error.value) == f"Encoder folder {name!r} does not exist."


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache, offline: hub ids resolve to what is laid out in it as huggingface_hub does."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _snapshot(cache, repo: str):
    revision = "0" * 40
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_id_in_the_cache_is_read_from_its_snapshot(hub_cache):
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET, image_size=40))
    model.save_pretrained(_snapshot(hub_cache, "someone/encoder"))
    config = encoder_backbone_config("someone/encoder")
    assert (config.backbone, config.image_size) == ("resnet18", 40)
    backbone = BarlowTwinsBackbone(config)
    load_encoder_into_backbones(backbone, "someone/encoder")
    for key, value in model.barlow_twins.backbone.state_dict().items():
        torch.testing.assert_close(backbone.barlow_twins.backbone.state_dict()[key], value, rtol=0, atol=0)


def test_a_hub_id_without_weights_in_the_cache_is_refused(hub_cache):
    BarlowTwinsConfig(**TINY_RESNET).save_pretrained(_snapshot(hub_cache, "someone/config-only"))
    with pytest.raises(FileNotFoundError, match="someone/config-only is neither a local folder nor a model on the hub"):
        encoder_backbone_config("someone/config-only")


PRETRAINED_CFG = {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.15], "crop_pct": 0.875,
                  "interpolation": "bilinear"}


def _timm_export(folder, backbone: str, model_args: dict, num_classes: int,
                 pretrained_cfg: dict = PRETRAINED_CFG) -> dict[str, torch.Tensor]:
    """A timm-format classifier folder as timm's push_to_hf_hub writes it; returns its weights."""
    network = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **model_args)
    folder.mkdir()
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": backbone, "num_classes": num_classes, "model_args": model_args, "pretrained_cfg": pretrained_cfg,
    }))
    return state


def test_a_timm_export_gives_its_preprocessing_and_timms_defaults_where_it_has_none(tmp_path):
    _timm_export(tmp_path / "full", "resnet18", {"channels": [8, 8, 16, 16]}, 0)
    config = encoder_backbone_config(tmp_path / "full")
    assert (config.image_size, config.image_mean, config.image_std) == (32, [0.5, 0.4, 0.3], [0.25, 0.2, 0.15])
    assert (config.crop_pct, config.interpolation) == (0.875, "bilinear")
    bare = {"input_size": [3, 48, 48], "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.15]}
    # test_resnet's own timm default is bilinear: a folder that names no filter still gets bicubic.
    _timm_export(tmp_path / "bare", "test_resnet", {}, 0, pretrained_cfg=bare)
    config = encoder_backbone_config(tmp_path / "bare")
    assert (config.image_size, config.crop_pct, config.interpolation) == (48, 1.0, "bicubic")


def test_an_encoder_model_itself_is_an_encoder(tmp_path):
    from modeling_barlow import BarlowTwinsModel

    encoder = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET, image_size=40))
    assert encoder_backbone_config(encoder).image_size == 40
    assert encoder_backbone_config(encoder).out_indices == [4]  # the last of stem, layer1 .. layer4
    backbone = BarlowTwinsBackbone(encoder_backbone_config(encoder))
    load_encoder_into_backbones(backbone, encoder)
    torch.testing.assert_close(backbone.barlow_twins.backbone.conv1.weight, encoder.backbone.conv1.weight, rtol=0, atol=0)


VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 1}


@pytest.mark.parametrize("backbone,model_args,num_classes,head", [
    ("resnet18", {"channels": [8, 8, 16, 16]}, 5, ["fc.weight", "fc.bias"]),
    ("vit_tiny_patch16_224", VIT, 5, ["head.weight", "head.bias"]),
    ("test_efficientnet", {}, 5, ["classifier.weight", "classifier.bias"]),
    # ConvNeXt's head holds a norm that its headless network keeps: nothing may be left out.
    ("convnext_atto", CONVNEXT, 0, []),
    ("convnext_atto", CONVNEXT, 5, ["head.fc.weight", "head.fc.bias"]),  # the backbone owns head.norm
], ids=["resnet classifier", "vit classifier", "efficientnet classifier", "convnext encoder", "convnext classifier"])
def test_a_timm_export_loads_without_a_classifier_head(tmp_path, backbone, model_args, num_classes, head):
    state = _timm_export(tmp_path / "export", backbone, model_args, num_classes=num_classes)
    config = encoder_backbone_config(tmp_path / "export")
    assert (config.image_size, config.crop_pct, config.interpolation) == (32, 0.875, "bilinear")
    model = BarlowTwinsBackbone(config)
    load_encoder_into_backbones(model, tmp_path / "export")
    loaded = model.barlow_twins.backbone.state_dict()
    assert set(loaded) == set(state) - set(head)
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_a_config_with_an_architecture_but_no_pretrained_cfg_is_not_a_timm_export(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    with pytest.raises(ValueError, match="is not a Barlow Twins encoder folder"):
        encoder_backbone_config(folder)


@pytest.mark.parametrize("spec,expected", [
    (TINY_RESNET, [1, 2, 3, 4]),  # the four layers, not the stem
    ({"backbone": "convnext_atto", "backbone_kwargs": CONVNEXT}, [0, 1, 2, 3]),  # all four stages
    ({"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 12, "embed_dim": 16, "num_heads": 1}},
     [2, 5, 8, 11]),
    ({"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 6, "embed_dim": 16, "num_heads": 1}},
     [1, 2, 3, 5]),  # round(6 k / 4) - 1
    ({"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 5, "embed_dim": 16, "num_heads": 1}},
     [0, 1, 3, 4]),  # Python rounds 2.5 to 2
    ({"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 3, "embed_dim": 16, "num_heads": 1}},
     [0, 1, 2]),
])
def test_default_pyramid_stages(spec, expected):
    config = BarlowTwinsConfig(**{"projector_dims": [8], **spec})
    assert default_pyramid_indices(config) == expected


@pytest.fixture
def encoder():
    return BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET, image_size=32))


def test_detr_reads_the_asked_stage_and_names_the_labels_both_ways(encoder):
    model = barlow_detr_for_object_detection(encoder, LABELS, out_indices=[3], **TINY_DETR)
    assert model.config.backbone_config.out_indices == [3]
    assert model.config.label2id == {"digit": 0, "shirt": 1, "shoe": 2}
    assert model.config.num_queries == 4


def test_upernet_on_two_stages_has_no_auxiliary_head_and_gets_its_settings(encoder):
    model = barlow_upernet_for_semantic_segmentation(encoder, LABELS, out_indices=[3, 4], hidden_size=8)
    assert model.config.use_auxiliary_head is False and model.auxiliary_head is None
    assert model.config.hidden_size == 8
    assert model.config.label2id == {"digit": 0, "shirt": 1, "shoe": 2}
    out = model.eval()(pixel_values=torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 3, 32, 32)


def test_upernet_on_three_stages_has_an_auxiliary_head_on_the_third(encoder):
    model = barlow_upernet_for_semantic_segmentation(encoder, LABELS, out_indices=[2, 3, 4], hidden_size=8,
                                                     auxiliary_channels=8)
    assert model.config.use_auxiliary_head and model.auxiliary_head is not None
    assert model.auxiliary_head.in_channels == 128  # the third map read: layer4 (layer2, 3, 4 have 32, 64, 128)
    out = model.train()(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.randint(0, 3, (2, 32, 32)))
    assert torch.isfinite(out.loss)


def test_an_encoder_saved_in_bfloat16_is_read_in_float32(tmp_path):
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert encoder_backbone_config(tmp_path / "bf16").dtype == torch.float32
