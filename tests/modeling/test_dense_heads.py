"""Detection (DETR) and segmentation (UperNet) on a pretrained encoder: after the model is built,
every backbone tensor must equal the saved encoder's (read from its safetensors file), and stay so
through save and reload; a model built from the config alone has other weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
    DetrConfig,
    DetrForObjectDetection,
)

from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForPreTraining,
    barlow_detr_for_object_detection,
    barlow_upernet_for_semantic_segmentation,
    encoder_backbone_config,
    load_encoder_into_backbones,
)

from ..conftest import TINY_RESNET
from .test_model_contract import _randomise_batchnorms


TINY_DETR = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 8}
LABELS = {0: "digit", 1: "shirt", 2: "shoe"}
PREFIX = "barlow_twins.backbone."


@pytest.fixture
def pretrained_folder(tmp_path):
    """A pretraining folder whose weights are unlike any initialisation."""
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET, image_size=32))
    _randomise_batchnorms(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(tmp_path / "pretrained")
    return tmp_path / "pretrained"


def _saved_backbone(folder) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in load_file(folder / "model.safetensors").items() if k.startswith(PREFIX)}


def _assert_backbone_is(network: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    state = network.state_dict()
    assert set(state) == set(saved) - {k for k in saved if k.endswith("num_batches_tracked") and k not in state}
    for key, value in state.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


def test_detr_holds_the_pretrained_encoder(tmp_path, pretrained_folder):
    saved = _saved_backbone(pretrained_folder)
    model = barlow_detr_for_object_detection(pretrained_folder, LABELS, **TINY_DETR)
    network = model.model.backbone.model.barlow_twins.backbone
    _assert_backbone_is(network, saved)
    # Why the helper exists: built from the config alone, the backbone is a new network.
    plain = DetrForObjectDetection(DetrConfig(backbone_config=encoder_backbone_config(pretrained_folder), **TINY_DETR))
    assert not torch.equal(plain.model.backbone.model.barlow_twins.backbone.conv1.weight, saved["conv1.weight"])

    targets = [{"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}] * 2
    out = model.train()(pixel_values=torch.randn(2, 3, 64, 64), labels=targets)
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 8, 4)  # 3 classes + "no object"
    model.save_pretrained(tmp_path / "detr")
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path / "detr")
    _assert_backbone_is(reloaded.model.backbone.model.barlow_twins.backbone, saved)
    assert reloaded.config.id2label == LABELS


def test_upernet_holds_the_pretrained_encoder_at_four_stages(tmp_path, pretrained_folder):
    saved = _saved_backbone(pretrained_folder)
    model = barlow_upernet_for_semantic_segmentation(pretrained_folder, LABELS, hidden_size=16, auxiliary_channels=8)
    assert model.backbone.out_features == ["layer1", "layer2", "layer3", "layer4"]
    _assert_backbone_is(model.backbone.barlow_twins.backbone, saved)
    out = model.train()(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.randint(0, 3, (2, 32, 32)))
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 3, 32, 32)
    trained = model.backbone.barlow_twins.backbone.state_dict()  # BatchNorm statistics moved in train()
    model.save_pretrained(tmp_path / "upernet")
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "upernet")
    _assert_backbone_is(reloaded.backbone.barlow_twins.backbone, trained)


def test_a_timm_format_export_is_an_encoder_too(tmp_path):
    from hub.export import export_timm_encoder

    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY_RESNET, image_size=48, image_std=0.3))
    _randomise_batchnorms(model)
    export_timm_encoder(model, tmp_path / "timm")
    saved = load_file(tmp_path / "timm" / "model.safetensors")
    detr = barlow_detr_for_object_detection(tmp_path / "timm", LABELS, **TINY_DETR)
    _assert_backbone_is(detr.model.backbone.model.barlow_twins.backbone, saved)
    backbone_config = detr.config.backbone_config
    assert (backbone_config.image_size, backbone_config.image_std) == (48, [0.3] * 3)


def test_a_different_architecture_or_no_backbone_is_refused(pretrained_folder):
    other = DetrForObjectDetection(DetrConfig(
        backbone_config=BarlowTwinsConfig(**{**TINY_RESNET, "backbone_kwargs": {"channels": [8, 16, 32, 64]}}, out_indices=[4]),
        **TINY_DETR,
    ))
    with pytest.raises(ValueError, match="does not fit the backbone .* of another shape"):
        load_encoder_into_backbones(other, pretrained_folder)
    with pytest.raises(ValueError, match="has no BarlowTwinsBackbone"):
        load_encoder_into_backbones(torch.nn.Linear(2, 2), pretrained_folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        barlow_detr_for_object_detection(pretrained_folder.parent / "nowhere", LABELS, **TINY_DETR)


@pytest.mark.slow
def test_a_hub_id_in_the_local_cache_is_an_encoder_too(tmp_path, pretrained_folder):
    """Offline, a hub id resolves to its snapshot in the HF cache (laid out as huggingface_hub does)."""
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "cache" / "models--someone--barlow-encoder" / "snapshots" / ("0" * 40)
    shutil.copytree(pretrained_folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    child = (
        "import sys, torch; from modeling_barlow import barlow_upernet_for_semantic_segmentation as build\n"
        "model = build('someone/barlow-encoder', {0: 'a', 1: 'b'}, hidden_size=8, auxiliary_channels=8)\n"
        "torch.save(model.backbone.barlow_twins.backbone.state_dict(), sys.argv[1])\n"
    )
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "state.pt")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "state.pt")
    saved = _saved_backbone(pretrained_folder)
    for key, value in state.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
