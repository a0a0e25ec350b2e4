"""barlow-finetune --task object-detection / semantic-segmentation, run as users run it (the
installed command, in a subprocess): exit status, saved folders in transformers' pipelines, the
encoder's weights in the saved model, metrics against an independent count, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsModel
from training.finetuning.dense.arguments import requested_task

from .scenes import CLASSES, digit_scenes, save_scene_dataset

TINY = {"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 16, 16, 32]}, "small_image_stem": True, "image_size": 32}
TINY_DETR = '{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, ' \
            '"encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 6}'
COMMAND = shutil.which("barlow-finetune", path=str(Path(sys.executable).parent))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def encoder(tmp_path) -> Path:
    torch.manual_seed(0)
    BarlowTwinsModel(BarlowTwinsConfig(**TINY, projector_dims=[16])).save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder"


@pytest.mark.slow
def test_segmentation_run_loads_in_the_pipeline_and_reports_miou(tmp_path, encoder):
    data = save_scene_dataset(tmp_path / "scenes", "semantic-segmentation", train=32, validation=8)
    done = _run("--task", "semantic-segmentation", "--model_name_or_path", str(encoder), "--dataset_name", str(data),
                "--output_dir", "seg", "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
                "--head_learning_rate", "1e-3", "--label_names", "background", *CLASSES,
                "--head_config", '{"hidden_size": 16, "auxiliary_channels": 8}', cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "seg"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3

    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=str(folder))
    assert segmenter.model.config.id2label == {0: "background", 1: "small", 2: "large"}
    # mIoU of the pipeline's masks, counted directly, agrees with the run's torchmetrics value.
    scenes = digit_scenes(8, seed=1)  # the validation split
    names = {"background": 0, "small": 1, "large": 2}
    intersections, unions = np.zeros(3), np.zeros(3)
    for scene in scenes:
        predicted = np.zeros((32, 32), np.int64)
        for segment in segmenter(scene["image"], subtask="semantic"):
            predicted[np.asarray(segment["mask"]) > 0] = names[segment["label"]]
        truth = np.asarray(scene["annotation"]).astype(np.int64)
        for c in range(3):
            intersections[c] += ((predicted == c) & (truth == c)).sum()
            unions[c] += ((predicted == c) | (truth == c)).sum()
    direct = float(np.mean(np.divide(intersections, unions, out=np.zeros(3), where=unions > 0)))
    assert metrics["eval_mean_iou"] == pytest.approx(direct, abs=0.02)


@pytest.mark.slow
def test_detection_run_keeps_a_frozen_encoder_and_loads_in_the_pipeline(tmp_path, encoder):
    data = save_scene_dataset(tmp_path / "scenes", "object-detection", train=24, validation=8)
    done = _run("--task", "object-detection", "--model_name_or_path", str(encoder), "--dataset_name", str(data),
                "--output_dir", "det", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
                "--freeze_backbone", "--head_config", TINY_DETR, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "det"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 <= metrics["eval_map"] <= 1 and metrics["global_step"] == 6
    saved = load_file(folder / "model.safetensors")
    encoder_weights = load_file(encoder / "model.safetensors")
    # Saved under transformers' original DETR names (model.backbone.conv_encoder.model...).
    backbone = {key.split(".barlow_twins.", 1)[1]: value for key, value in saved.items() if ".barlow_twins." in key}
    compared = 0
    for key, value in encoder_weights.items():
        if key.endswith("num_batches_tracked"):
            continue  # DETR's frozen BatchNorm keeps no counter
        torch.testing.assert_close(backbone[key], value, rtol=0, atol=0, msg=key)
        compared += 1
    assert compared > 50

    from transformers import pipeline

    detector = pipeline("object-detection", model=str(folder), threshold=0.0)
    found = detector(digit_scenes(1, seed=1)[0]["image"])
    assert found and set(found[0]) == {"score", "label", "box"} and found[0]["label"] in CLASSES
    assert json.loads((folder / "training_args.json").read_text())["label_names"] == CLASSES


@pytest.mark.parametrize(
    "task,make,message",
    [
        ("semantic-segmentation", "object-detection", "no segmentation masks: semantic-segmentation needs, besides the "
                                                      "image column 'image', a mask column"),
        ("object-detection", "semantic-segmentation", "has no boxes: object-detection needs an 'objects' column holding, "
                                                      "per image, 'bbox' (one box per object) and 'category'"),
    ],
)
def test_a_dataset_without_annotations_names_the_columns_expected(tmp_path, encoder, task, make, message):
    data = save_scene_dataset(tmp_path / "scenes", make, train=4, validation=2)
    done = _run("--task", task, "--model_name_or_path", str(encoder), "--dataset_name", str(data),
                "--output_dir", "out", cwd=tmp_path)
    assert done.returncode == 2  # a dataset to change, or --mask_column / --objects_column (1 before #35)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_out_indices_beyond_the_stages_and_missing_data_are_refused(tmp_path, encoder):
    data = save_scene_dataset(tmp_path / "scenes", "semantic-segmentation", train=4, validation=2)
    done = _run("--task", "semantic-segmentation", "--model_name_or_path", str(encoder), "--dataset_name", str(data),
                "--output_dir", "out", "--out_indices", "2", "9", "--label_names", "a", "b", "c", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr  # a usage error
    assert "valid indices are 0 to 4" in done.stderr and "4=layer4 (32 channels" in done.stderr
    done = _run("--task", "object-detection", "--model_name_or_path", str(encoder), "--output_dir", "out2", cwd=tmp_path)
    assert done.returncode == 2 and "--task object-detection needs --dataset_name" in done.stderr
    # A usage error takes away the (still empty) output folders the command made.
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_task_is_read_from_the_command_line_or_the_config_file(tmp_path):
    assert requested_task(["--output_dir", "x", "--task", "object-detection"]) == "object-detection"
    assert requested_task(["--task=semantic-segmentation"]) == "semantic-segmentation"
    assert requested_task(["--output_dir", "x"]) is None
    (tmp_path / "run.yaml").write_text("task: semantic-segmentation\noutput_dir: x\n")
    assert requested_task(["--config", str(tmp_path / "run.yaml")]) == "semantic-segmentation"


def test_push_to_hub_uploads_the_saved_detection_model(tmp_path, encoder, monkeypatch):
    # In process, with the hub's two calls replaced: the options the classifier takes for publishing
    # are accepted, and the upload carries the folder as saved (publish's formats are the encoder's).
    from huggingface_hub import HfApi

    from training.finetune import main

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir()))))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    data = save_scene_dataset(tmp_path / "scenes", "object-detection", train=4, validation=2)
    out = tmp_path / "det"
    main(["--task", "object-detection", "--model_name_or_path", str(encoder), "--dataset_name", str(data),
          "--output_dir", str(out), "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
          "--head_config", TINY_DETR, "--push_to_hub", "--hub_model_id", "someone/barlow-detr", "--hub_private_repo"])
    assert calls[0] == ("create", "someone/barlow-detr", {"private": True, "exist_ok": True})
    assert calls[1] == ("upload", "someone/barlow-detr", sorted(p.name for p in out.iterdir()))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "metrics.json"} <= set(calls[1][2])
