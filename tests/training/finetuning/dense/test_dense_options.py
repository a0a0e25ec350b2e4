"""barlow-finetune --task's data options, from the command line through load_dense_data into the
collators and metrics, in process on small saved scene datasets: --bbox_format pascal_voc (boxes
as corners) and --ignore_index (pixels left out of the class count and of the scores)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from barlow_cli import parse_arguments
from training.finetuning.dense.data import DetectionCollator, SegmentationCollator, detection_transform, load_dense_data, \
    segmentation_transform
from training.arguments import DataArguments
from training.finetuning.dense.arguments import DenseTaskArguments
from training.finetuning.dense.finetune import ARGUMENT_TYPES
from training.finetuning.dense.metrics import evaluate_segmentation

from .scenes import CLASSES, digit_scenes

MEAN, STD = [0.5] * 3, [0.25] * 3


def _dense_data(folder, *options: str):
    parsed = parse_arguments(ARGUMENT_TYPES, ["--output_dir", str(folder / "out"), "--dataset_name", str(folder / "data"),
                                              "--model_name_or_path", "unused", *options])
    by_type = {type(arguments): arguments for arguments in parsed}
    return load_dense_data(by_type[DataArguments], by_type[DenseTaskArguments])


def _save(folder, features, rows_by_split):
    splits = {name: datasets.Dataset.from_list(rows, features=features) for name, rows in rows_by_split.items()}
    datasets.DatasetDict(splits).save_to_disk(str(folder / "data"))


def test_pascal_voc_boxes_are_read_as_corners(tmp_path):
    scenes = digit_scenes(4, seed=2)
    features = datasets.Features({"image": datasets.Image(), "objects": {
        "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
        "category": datasets.List(datasets.ClassLabel(names=CLASSES)),
    }})
    # The same scenes with COCO's [x, y, width, height] turned into [x_min, y_min, x_max, y_max].
    corners = [{"image": s["image"], "objects": {"bbox": [[x, y, x + w, y + h] for x, y, w, h in s["objects"]["bbox"]],
                                                 "category": s["objects"]["category"]}} for s in scenes]
    _save(tmp_path, features, {"train": corners, "validation": corners[:1]})
    data = _dense_data(tmp_path, "--task", "object-detection", "--bbox_format", "pascal_voc")
    assert data.bbox_format == "pascal_voc"
    collate = DetectionCollator(detection_transform(32, MEAN, STD, train=False), data.image_column,
                                data.annotation_column, len(data.label_names), data.bbox_format)
    batch = next(iter(data.loader("train", collate, batch_size=4)))
    # DETR's targets, computed here from the COCO boxes: centre and size over the 32 px image.
    for target, xyxy, scene in zip(batch["labels"], batch["boxes_xyxy"], scenes):
        expected = torch.tensor([[(x + w / 2) / 32, (y + h / 2) / 32, w / 32, h / 32]
                                 for x, y, w, h in scene["objects"]["bbox"]])
        torch.testing.assert_close(target["boxes"], expected)
        torch.testing.assert_close(xyxy, torch.tensor([[x, y, x + w, y + h] for x, y, w, h in scene["objects"]["bbox"]]))
        assert target["class_labels"].tolist() == scene["objects"]["category"]
    # Read as COCO boxes (the default), the same numbers are other boxes.
    coco = _dense_data(tmp_path, "--task", "object-detection")
    assert coco.bbox_format == "coco"
    with pytest.raises(SystemExit) as refused:
        _dense_data(tmp_path, "--task", "object-detection", "--bbox_format", "yolo")
    assert refused.value.code == 2


class _Predicts(torch.nn.Module):
    """Answers every batch with fixed masks (one-hot logits over 3 classes)."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.masks = masks

    def forward(self, pixel_values):
        logits = torch.nn.functional.one_hot(self.masks[: len(pixel_values)], 3).permute(0, 3, 1, 2).float()
        return type("Output", (), {"logits": logits})()


def test_ignored_pixels_are_left_out_of_the_classes_and_the_scores(tmp_path):
    scenes = digit_scenes(4, seed=4)
    masks = [np.asarray(s["annotation"]).copy() for s in scenes]
    for mask in masks:
        mask[:4] = 7  # a border of "don't care" pixels, labelled 7
    rows = [{"image": s["image"], "annotation": Image.fromarray(m)} for s, m in zip(scenes, masks)]
    _save(tmp_path, datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()}),
          {"train": rows, "validation": rows})
    data = _dense_data(tmp_path, "--task", "semantic-segmentation", "--ignore_index", "7")
    assert data.ignore_index == 7
    assert data.label_names == ["0", "1", "2"]  # 7 is no class
    assert _dense_data(tmp_path, "--task", "semantic-segmentation").label_names == [str(i) for i in range(8)]

    collate = SegmentationCollator(segmentation_transform(32, MEAN, STD, train=False), data.image_column,
                                   data.annotation_column)
    loader = data.loader("eval", collate, batch_size=4)
    truth = torch.from_numpy(np.stack(masks)).long()
    # Right everywhere but the ignored border, where it says class 1: a perfect score with the option.
    predicted = torch.where(truth == 7, 1, truth)
    scores = evaluate_segmentation(_Predicts(predicted), loader, len(data.label_names), data.ignore_index)
    assert scores == {"mean_iou": pytest.approx(1.0), "pixel_accuracy": pytest.approx(1.0)}
    # Wrong on a known set of counted pixels: the accuracy is the share right, counted here.
    wrong = predicted.clone()
    wrong[:, 4:8] = 0
    counted = truth != 7
    expected = ((wrong == truth) & counted).sum().item() / counted.sum().item()
    scores = evaluate_segmentation(_Predicts(wrong), loader, len(data.label_names), data.ignore_index)
    assert scores["pixel_accuracy"] == pytest.approx(expected, abs=1e-6) and expected < 1
