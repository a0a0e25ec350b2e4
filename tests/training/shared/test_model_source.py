"""load_model_source with a checkpoint saved in bf16 (as the GPU runs export encoders): the protocols
get float32 weights, equal to the saved values, and barlow-eval runs on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsModel, create_image_processor
from tests.cli import returning
from training.evaluate import main

evaluate = returning(main, "eval_results.json")
from training.shared.model_source import load_model_source

TINY = {"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 16, 16, 32]}, "small_image_stem": True, "image_size": 16}


def _save(model: BarlowTwinsModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    create_image_processor(model.config).save_pretrained(folder)
    return folder


@pytest.fixture
def bf16_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    return _save(BarlowTwinsModel(BarlowTwinsConfig(**TINY, projector_dims=[16])).to(torch.bfloat16), tmp_path / "bf16")


@pytest.mark.parametrize("random_init", [False, True])
def test_bf16_checkpoint_gives_float32_models(bf16_folder, random_init):
    saved = load_file(bf16_folder / "model.safetensors")
    # The premise: weights stored in bf16 (BatchNorm's step counters are integers).
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    source = load_model_source(str(bf16_folder), random_init=random_init)
    encoder = source.encoder()
    classifier, head = source.classifier(["a", "b", "c"])
    for model in (encoder, classifier):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    if not random_init:  # the stored values, upcast exactly
        state = encoder.state_dict()
        for key, value in saved.items():
            torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0)
    images = torch.randn(2, 3, 16, 16)  # float32, as the evaluation loaders give them
    with torch.no_grad():
        assert encoder(pixel_values=images).pooler_output.dtype == torch.float32
        assert classifier(pixel_values=images).logits.shape == (2, 3)


def test_barlow_eval_on_a_bf16_export_matches_its_float32_copy(tmp_path, bf16_folder):
    # The same weights in float32: bf16 values are exact in float32, so every result must agree.
    float32_folder = _save(BarlowTwinsModel.from_pretrained(bf16_folder, dtype=torch.float32), tmp_path / "fp32")
    assert {t.dtype for t in load_file(float32_folder / "model.safetensors").values() if t.is_floating_point()} == {torch.float32}
    common = ["--protocol", "knn", "--knn_k", "5", "--max_train_samples", "200", "--max_eval_samples", "60",
              "--no_cache_features", "--seed", "0"]
    from_bf16 = evaluate(["--model_name_or_path", str(bf16_folder), "--output_dir", str(tmp_path / "a"), *common])
    from_fp32 = evaluate(["--model_name_or_path", str(float32_folder), "--output_dir", str(tmp_path / "b"), *common])
    assert 0.0 <= from_bf16["knn_top1"] <= 1.0
    assert from_bf16["knn_top1"] == from_fp32["knn_top1"] and from_bf16["knn_top5"] == from_fp32["knn_top5"]
