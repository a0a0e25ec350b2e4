"""barlow-finetune: class names into id2label, an evaluation every epoch, the image-classification
pipeline on the saved folder, a frozen backbone, options from a file, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from transformers import AutoModelForImageClassification, pipeline

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsModel, create_image_processor
from tests.cli import returning
from training.finetune import main

finetune = returning(main, "metrics.json")


TINY = {"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 16, 16, 32]}, "small_image_stem": True, "image_size": 16}
NAMES = {0: "zero", 1: "one", 2: "two"}


@pytest.fixture
def encoder(tmp_path) -> Path:
    """An encoder folder (BarlowTwinsModel and its processor), randomly initialised."""
    folder = tmp_path / "encoder"
    torch.manual_seed(0)
    model = BarlowTwinsModel(BarlowTwinsConfig(**TINY, projector_dims=[16]))
    model.save_pretrained(folder)
    create_image_processor(model.config).save_pretrained(folder)
    return folder


@pytest.fixture
def named_imagefolder(tmp_path) -> Path:
    """Digits 0, 1 and 2 in an imagefolder with train/ and test/ and class folders named by word."""
    digits = load_digits()
    root = tmp_path / "images"
    seen = {split: 0 for split in ("train", "test")}
    for i, target in enumerate(digits.target[:200]):
        if target not in NAMES:
            continue
        split = "test" if seen["test"] < 18 and i % 3 == 0 else "train"
        if split == "train" and seen["train"] >= 45:
            continue
        seen[split] += 1
        folder = root / split / NAMES[int(target)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(folder / f"{i}.png")
    return root


def test_finetune_saves_a_pipeline_ready_classifier_with_class_names(tmp_path, encoder, named_imagefolder):
    out = tmp_path / "classifier"
    metrics = finetune([
        "--model_name_or_path", str(encoder), "--dataset_name", str(named_imagefolder), "--output_dir", str(out),
        "--num_train_epochs", "5", "--per_device_train_batch_size", "16", "--min_crop_scale", "1.0",
        "--learning_rate", "0.05", "--logging_steps", "1",
    ])
    # Evaluated at every epoch end; 42 training images in batches of 16 make 3 steps per epoch.
    assert [(h["epoch"], h["step"]) for h in metrics["history"]] == [(e, 3 * e) for e in range(1, 6)]
    assert "eval_top5" not in metrics  # 3 classes
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "lr_head" in h] == list(range(1, 16))
    # The totals, against what the test counts and the per-step losses logged (--logging_steps 1).
    train_files = list((named_imagefolder / "train").glob("*/*.png"))
    assert (metrics["num_train_examples"], metrics["skipped_images"]) == (len(train_files), 0)
    assert (metrics["epochs"], metrics["global_step"], metrics["eval_split"]) == (5, 15, "test")
    last_epoch = [h["train_loss"] for h in history if "lr_head" in h and h["step"] > 12]
    assert metrics["train_loss"] == pytest.approx(np.mean(last_epoch), rel=1e-6)
    assert all(h["lr_head"] == pytest.approx(10 * h["lr_backbone"]) for h in history if "lr_head" in h)

    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "BarlowTwinsForImageClassification"
    assert model.config.id2label == {0: "one", 1: "two", 2: "zero"}  # the ClassLabel names (sorted folders)
    # The pipeline, from the folder alone, agrees with the evaluation the trainer logged.
    classifier = pipeline("image-classification", model=str(out))
    images = sorted((named_imagefolder / "test").glob("*/*.png"))
    predictions = classifier([Image.open(p) for p in images], top_k=1)
    accuracy = np.mean([p[0]["label"] == path.parent.name for p, path in zip(predictions, images)])
    assert metrics["eval_top1"] == pytest.approx(accuracy, abs=1 / len(images) + 1e-9)
    # 3 classes, chance 1/3. Measured with encoder seeds 0-3: 0.89, 0.67, 0.89, 0.72 (this test: seed 0).
    assert metrics["eval_top1"] > 0.5


def test_frozen_backbone_trains_only_the_head(tmp_path, encoder, named_imagefolder):
    # Options from a YAML file; the command line overrides it.
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"model_name_or_path: {encoder}\ndataset_name: {named_imagefolder}\nper_device_train_batch_size: 16\n"
        "num_train_epochs: 5\nfreeze_backbone: true\nmin_crop_scale: 1.0\n"
    )
    finetune(["--config", str(config), "--output_dir", str(tmp_path / "frozen"), "--num_train_epochs", "1"])
    finetune(["--config", str(config), "--output_dir", str(tmp_path / "full"), "--num_train_epochs", "1",
              "--freeze_backbone", "false"])
    before = {k: v for k, v in load_file(encoder / "model.safetensors").items()}
    frozen = load_file(tmp_path / "frozen" / "model.safetensors")
    full = load_file(tmp_path / "full" / "model.safetensors")
    assert json.loads((tmp_path / "frozen" / "training_args.json").read_text())["total_steps"] == 3  # 1 epoch, not 5
    for key, value in before.items():  # weights and BatchNorm statistics alike
        assert torch.equal(frozen[f"barlow_twins.{key}"], value), key
    assert any(not torch.equal(full[f"barlow_twins.{key}"], value) for key, value in before.items())
    assert not torch.allclose(frozen["classifier.weight"], full["classifier.weight"])


def test_bad_input_ends_with_a_message(tmp_path, encoder, named_imagefolder, capsys):
    with pytest.raises(SystemExit) as error:
        finetune(["--model_name_or_path", str(encoder), "--dataset_name", str(named_imagefolder),
                  "--output_dir", str(tmp_path / "out"), "--label_column", "digit"])
    err = capsys.readouterr().err
    assert error.value.code == 2  # an option to change, --label_column (1 before #35)
    assert "Label column 'digit' not found; the dataset has columns ['image', 'label']" in err
    with pytest.raises(SystemExit) as error:
        finetune(["--model_name_or_path", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    # A model folder that is not there: an input to change (1 before #35).
    assert error.value.code == 2 and err.strip().splitlines()[-1].startswith("barlow-finetune: error:") and "does not exist" in err


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as done:
        finetune(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model_name_or_path", "--num_train_epochs", "--learning_rate", "--head_learning_rate",
                   "--per_device_train_batch_size", "--per_device_eval_batch_size", "--output_dir", "--label_column",
                   "--eval_split", "--freeze_backbone", "--random_init", "--config"):
        assert option in text, option


@pytest.mark.parametrize("task", ["image-classification", "object-detection"])
def test_help_states_the_real_warmup_default(task, capsys, monkeypatch):
    # The help said "the paper's 10 ... else 1%" (pretraining's default) over a default of 0.0.
    monkeypatch.setattr("sys.argv", ["barlow-finetune"])
    with pytest.raises(SystemExit) as done:
        main(["--task", task, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    help_text = text.split("--warmup_epochs WARMUP_EPOCHS, --warmup-epochs WARMUP_EPOCHS ", 1)[1].split(" --", 1)[0]
    assert help_text == ("Linear warm-up length in epochs, before the cosine schedule. None by default: the paper's "
                         "fine-tuning has none (its 10 warm-up epochs are pretraining's). (default: 0.0)")
    from training.finetuning.arguments import FinetuningArguments
    from training.finetuning.dense.arguments import DenseFinetuningArguments

    assert FinetuningArguments.__dataclass_fields__["warmup_epochs"].default == 0.0
    assert DenseFinetuningArguments.__dataclass_fields__["warmup_epochs"].default == 0.0
