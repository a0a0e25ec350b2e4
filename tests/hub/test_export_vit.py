"""Vision Transformer encoders publish in timm's format: timm, TimmWrapper (AutoModel), the
pipelines and AutoModelForImageClassification load them with no custom code, and compute our
features, with the trained patch size, input size and pooling."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from transformers import AutoModelForImageClassification

from .helpers import BLOCKED, TINY, populate_hub_cache, run_isolated
from .test_export import CHILD_TIMM
from hub import export_model, export_timm_encoder
from hub.model_card import create_model_card
from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForImageClassification, BarlowTwinsForPreTraining

# A small-patch ViT timm can rebuild: 4 px patches at 32 px, 2 blocks of width 32, mean pooling
# (not the architecture's default, so a folder that lost it would compute other features).
VIT = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, "global_pool": "avg"},
    "image_size": 32,
    "projector_dims": [16, 16],
}


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    # Perturb every weight, including the tokens and norms timm initialises to constants, so a
    # loader that dropped or re-initialised any of them could not pass.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_vit_encoder_is_a_timm_repository_that_loads_without_the_project(tmp_path, photo):
    model = _trained_looking(BarlowTwinsForPreTraining(BarlowTwinsConfig(**VIT)))
    result = export_model(model, tmp_path / "export")
    assert result.encoder_format == "timm" and not result.notes
    config = json.loads((result.folder / "config.json").read_text())
    # The saved config, the published folder and the image processor agree on size and pooling.
    assert config["model_args"]["img_size"] == 32 and config["model_args"]["patch_size"] == 4
    assert config["model_args"]["global_pool"] == "avg"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    populate_hub_cache(tmp_path / "hub_cache", "barlow-test/tiny-vit", result.folder)
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    photo.save(tmp_path / "image.png")

    run_isolated(CHILD_TIMM, ["x.pt", "image.png", "out.pt", str(result.folder), "barlow-test/tiny-vit"], tmp_path)

    with torch.no_grad():
        expected = model.barlow_twins(x).pooler_output
        for ref, loaded in torch.load(tmp_path / "out.pt").items():
            assert all(not name.startswith(BLOCKED) for name in loaded["classes"]), loaded["classes"]
            torch.testing.assert_close(loaded["timm"], expected, atol=1e-5, rtol=1e-5)
            assert loaded["auto_class"] == "TimmWrapperModel"
            torch.testing.assert_close(loaded["auto"], expected, atol=1e-5, rtol=1e-5)
            assert loaded["processor_pixels"].shape == (1, 3, 32, 32)
            torch.testing.assert_close(loaded["processor_pixels"], loaded["timm_pixels"])
            from_pipeline = model.barlow_twins(loaded["processor_pixels"]).pooler_output
            torch.testing.assert_close(loaded["pipeline"], from_pipeline, atol=1e-5, rtol=1e-5)
            assert loaded["classifier_class"] == "TimmWrapperForImageClassification"
            torch.testing.assert_close(loaded["classifier_features"], expected, atol=1e-5, rtol=1e-5)


def test_fine_tuned_vit_classifier_keeps_its_head(tmp_path):
    labels = {0: "shirt", 1: "shoe"}
    model = _trained_looking(BarlowTwinsForImageClassification(BarlowTwinsConfig(**VIT, id2label=labels)))
    folder = export_timm_encoder(model, tmp_path / "export")
    x = torch.randn(2, 3, 32, 32)
    network = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    wrapper = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(network(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wrapper(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert wrapper.config.id2label == labels


@pytest.mark.parametrize("global_pool, words", [("avg", "the mean of the patch tokens"), ("token", "the class token")])
def test_model_card_says_how_the_features_are_pooled(global_pool, words):
    config = BarlowTwinsConfig(**{**VIT, "backbone_kwargs": {**VIT["backbone_kwargs"], "global_pool": global_pool}})
    card = str(create_model_card(config, encoder_format="timm", repo_id="barlow-test/tiny-vit"))
    assert f"32-dimensional pooled features ({words}, timm's `global_pool`)" in card
    resnet_card = str(create_model_card(BarlowTwinsConfig(**TINY), encoder_format="timm", repo_id="barlow-test/r"))
    assert "32-dimensional pooled features." in resnet_card  # a CNN's spatial pooling needs no words
