"""Pipelines and the image processor on a real photo shipped with scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import AutoImageProcessor, pipeline

from modeling_barlow import BarlowTwinsForImageClassification, BarlowTwinsForPreTraining, create_image_processor


def _timm_eval_transform(image, config) -> torch.Tensor:
    """timm's own evaluation transform, the independent reference for the processor."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, config.image_size, config.image_size), interpolation=config.interpolation,
        mean=tuple(config.image_mean), std=tuple(config.image_std), crop_pct=config.crop_pct,
    )
    return transform(image)


def test_processor_matches_timms_eval_transform(tmp_path, tiny_config, photo):
    processor = create_image_processor(tiny_config)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    ours = loaded(photo, return_tensors="pt")["pixel_values"][0]
    reference = _timm_eval_transform(photo, tiny_config)
    assert ours.shape == reference.shape == (3, 32, 32)
    # Resize implementations (PIL's bicubic against torchvision's): not bit-identical, but 7.9e-5 apart
    # on average (0.018 at most); resampling bilinear instead would be 0.036 (0.40) away.
    difference = (ours - reference).abs()
    assert difference.mean() < 1e-3 and difference.max() < 0.05
    assert loaded.size["shortest_edge"] == math.floor(32 / tiny_config.crop_pct)


def _save(model, folder):
    model.save_pretrained(folder)
    create_image_processor(model.config).save_pretrained(folder)


def test_feature_extraction_pipeline(tmp_path, tiny_config, photo):
    model = BarlowTwinsForPreTraining(tiny_config).eval()
    _save(model, tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    pooled = np.array(extractor(photo, pool=True))
    assert pooled.shape == (1, 128)
    pixels = create_image_processor(tiny_config)(photo, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.barlow_twins(pixels).pooler_output.numpy()
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)
    unpooled = np.array(extractor(photo))
    assert unpooled.shape == (1, 128, 1, 1)  # last_hidden_state, (B, C, H, W) for a CNN


def test_image_classification_pipeline(tmp_path, tiny_config, photo):
    tiny_config.id2label = {0: "pagoda", 1: "flower", 2: "digit"}
    tiny_config.label2id = {v: k for k, v in tiny_config.id2label.items()}
    model = BarlowTwinsForImageClassification(tiny_config).eval()
    _save(model, tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    predictions = classifier(photo, top_k=3)
    assert {p["label"] for p in predictions} == {"pagoda", "flower", "digit"}
    pixels = create_image_processor(tiny_config)(photo, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixels).logits.softmax(-1)[0]
    by_label = {p["label"]: p["score"] for p in predictions}
    for index, label in tiny_config.id2label.items():
        assert abs(by_label[label] - probabilities[index].item()) < 1e-4
