"""Exports load where this project cannot be imported, and compute what our model computes.

Outputs are compared with independent computations: plain timm networks, transformers'
TimmWrapper classes and pipelines, all built from the exported files alone.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch

from .helpers import BLOCKED, TINY, populate_hub_cache, run_isolated, tiny_model
from hub import (
    TimmExportError,
    export_encoder,
    export_full_model,
    export_model,
    export_timm_encoder,
    load_barlow_model,
)
from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForImageClassification,
    create_image_processor,
)


CHILD_TIMM = """
import os
import torch, timm
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

for name in ("modeling_barlow", "training", "hub"):
    try:
        __import__(name)
        raise SystemExit(name + " is importable")
    except ImportError:
        pass
inputs, image_path, out, *refs = sys.argv[1:]
x = torch.load(inputs)
image = Image.open(image_path)
results = {}
for ref in refs:
    network = timm.create_model(("local-dir:" if os.path.isdir(ref) else "hf-hub:") + ref, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(network), is_training=False)
    encoder = AutoModel.from_pretrained(ref).eval()
    processor = AutoImageProcessor.from_pretrained(ref)
    extractor = pipeline("image-feature-extraction", model=ref)
    classifier = AutoModelForImageClassification.from_pretrained(ref, num_labels=5).eval()
    with torch.no_grad():
        results[ref] = {
            "timm": network(x),
            "num_classes": network.num_classes,
            "auto": encoder(x).pooler_output,
            "auto_class": type(encoder).__name__,
            "processor_pixels": processor(image, return_tensors="pt").pixel_values,
            "timm_pixels": transform(image).unsqueeze(0),
            "pipeline": torch.tensor(extractor(image, pool=True)),
            "classifier_class": type(classifier).__name__,
            "classifier_logits": classifier(x).logits,
            "classifier_features": classifier.timm_model.forward_head(classifier.timm_model.forward_features(x), pre_logits=True),
            "classes": [type(m).__module__ for m in (encoder, classifier, network)],
        }
torch.save(results, out)
"""


def test_timm_export_loads_without_the_project_and_matches(tmp_path, photo):
    model = tiny_model()
    folder = export_timm_encoder(model, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    populate_hub_cache(tmp_path / "hub_cache", "barlow-test/tiny-timm", folder)
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    photo.save(tmp_path / "image.png")

    run_isolated(CHILD_TIMM, ["x.pt", "image.png", "out.pt", str(folder), "barlow-test/tiny-timm"], tmp_path)

    results = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = model.barlow_twins(x).pooler_output
        for ref, result in results.items():
            assert all(not name.startswith(BLOCKED) for name in result["classes"]), result["classes"]
            assert result["num_classes"] == 0, ref
            torch.testing.assert_close(result["timm"], expected, atol=1e-5, rtol=1e-5)
            assert result["auto_class"] == "TimmWrapperModel"
            torch.testing.assert_close(result["auto"], expected, atol=1e-5, rtol=1e-5)
            # The pipeline's processor is timm's own evaluation transform.
            torch.testing.assert_close(result["processor_pixels"], result["timm_pixels"])
            pipeline_expected = model.barlow_twins(result["processor_pixels"]).pooler_output
            torch.testing.assert_close(result["pipeline"], pipeline_expected, atol=1e-5, rtol=1e-5)
            assert result["classifier_class"] == "TimmWrapperForImageClassification"
            assert result["classifier_logits"].shape == (3, 5)
            torch.testing.assert_close(result["classifier_features"], expected, atol=1e-5, rtol=1e-5)


def test_timm_config_and_weights_follow_timm(tmp_path):
    model = tiny_model()
    folder = export_timm_encoder(model, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18"
    assert config["num_features"] == 32
    assert config["model_args"] == {"channels": [8, 16, 16, 32]}  # never num_classes
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32]
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["first_conv"], cfg["classifier"]) == (
        "bicubic",
        0.95,
        "conv1",
        "fc",
    )
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and cfg["std"] == pytest.approx([0.229, 0.224, 0.225])
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    reference = timm.create_model("resnet18", num_classes=0, channels=[8, 16, 16, 32]).state_dict()
    assert tensors.keys() == reference.keys()
    ours = model.state_dict()
    for key, tensor in tensors.items():
        torch.testing.assert_close(tensor, ours[f"barlow_twins.backbone.{key}"], rtol=0, atol=0)


def test_small_image_stem_is_refused_as_timm_and_exported_with_code(tmp_path):
    model = tiny_model(small_image_stem=True)
    with pytest.raises(TimmExportError, match="small-image stem.*trust_remote_code"):
        export_timm_encoder(model, tmp_path / "timm")
    assert not (tmp_path / "timm" / "config.json").exists()
    assert export_encoder(model, tmp_path / "encoder") == "transformers"
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert "pretrained_cfg" not in config and config["small_image_stem"] is True
    assert config["architectures"] == ["BarlowTwinsModel"] and "AutoModel" in config["auto_map"]
    assert model.config.architectures != ["BarlowTwinsModel"]  # the caller's config is untouched


def test_verification_catches_a_timm_config_that_builds_another_network(tmp_path, monkeypatch):
    # Pretend timm could rebuild the small stem: the check against the trained model must refuse.
    monkeypatch.setattr("hub.export.timm_incompatibility", lambda config: None)
    with pytest.raises(TimmExportError):
        export_timm_encoder(tiny_model(small_image_stem=True), tmp_path / "wrong")
    assert not any((tmp_path / "wrong").iterdir())


def test_fine_tuned_classifier_keeps_its_head_in_timm_format(tmp_path):
    labels = {0: "cat", 1: "dog", 2: "bird"}
    model = BarlowTwinsForImageClassification(BarlowTwinsConfig(**TINY, id2label=labels)).eval()
    with torch.no_grad():
        model.classifier.weight.normal_()
    folder = export_timm_encoder(model, tmp_path / "export")
    x = torch.randn(2, 3, 32, 32)
    network = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    from transformers import AutoModelForImageClassification

    wrapper = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(network(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wrapper(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert wrapper.config.id2label == labels


CHILD_CODE = """
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, pipeline

inputs, image_path, out, *refs = sys.argv[1:]
x = torch.load(inputs)
image = Image.open(image_path)
results = {}
for ref in refs:
    encoder = AutoModel.from_pretrained(ref, trust_remote_code=True).eval()
    extractor = pipeline("image-feature-extraction", model=ref, trust_remote_code=True)
    classifier = AutoModelForImageClassification.from_pretrained(ref, num_labels=3, trust_remote_code=True).eval()
    pretraining = AutoModelForPreTraining.from_pretrained(ref, subfolder="pretraining", trust_remote_code=True).eval()
    with torch.no_grad():
        results[ref] = {
            "pooled": encoder(x).pooler_output,
            "pipeline": torch.tensor(extractor(image, pool=True)),
            "classifier_pooled": classifier.barlow_twins(x).pooler_output,
            "logits_shape": list(classifier(x).logits.shape),
            "projections": pretraining(x).projections,
            "classes": [type(m).__module__ for m in (encoder, classifier, pretraining)],
        }
torch.save(results, out)
"""


def test_code_exports_load_with_trust_remote_code_without_the_project(tmp_path, photo):
    model = tiny_model(small_image_stem=True)
    result = export_model(model, tmp_path / "export", format="both")
    assert (result.encoder_format, result.pretraining_subfolder) == ("transformers", "pretraining")
    populate_hub_cache(tmp_path / "hub_cache", "barlow-test/tiny-stem", result.folder)
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    photo.save(tmp_path / "image.png")

    run_isolated(CHILD_CODE, ["x.pt", "image.png", "out.pt", str(result.folder), "barlow-test/tiny-stem"], tmp_path)

    pixels = create_image_processor(model.config)(photo, return_tensors="pt").pixel_values
    with torch.no_grad():
        pooled, projections = model.barlow_twins(x).pooler_output, model(x).projections
        from_pipeline = model.barlow_twins(pixels).pooler_output
    for ref, loaded in torch.load(tmp_path / "out.pt").items():
        assert all(name.startswith("transformers_modules.") for name in loaded["classes"]), (ref, loaded["classes"])
        torch.testing.assert_close(loaded["pooled"], pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded["classifier_pooled"], pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded["projections"], projections, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded["pipeline"], from_pipeline, atol=1e-5, rtol=1e-5)
        assert loaded["logits_shape"] == [3, 3]


def test_full_export_needs_the_projector(tmp_path):
    model = tiny_model()
    classifier = BarlowTwinsForImageClassification(model.config)
    with pytest.raises(ValueError, match="projector"):
        export_full_model(classifier, tmp_path / "full")
    with pytest.raises(ValueError, match="projector"):
        export_model(classifier, tmp_path / "both", format="both")
    with pytest.raises(ValueError, match="format"):
        export_model(model, tmp_path / "x", format="timm")


def test_load_barlow_model_explains_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_barlow_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_barlow_model(tmp_path / "empty")
    timm_folder = export_timm_encoder(tiny_model(), tmp_path / "timm")
    with pytest.raises(ValueError, match="timm-format folder"):
        load_barlow_model(timm_folder)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'"):
        load_barlow_model(tmp_path / "bert")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_barlow_model(tmp_path / "broken")
    tiny_model().config.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(ValueError, match="weights are missing"):
        load_barlow_model(tmp_path / "no_weights")
