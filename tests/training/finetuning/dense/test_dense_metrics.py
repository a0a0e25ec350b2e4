"""The evaluation plumbing of dense fine-tuning (collators, box formats, DETR's post-processing,
torchmetrics) on models whose answers are known: perfect predictions score 1, and a known mistake
scores what pycocotools or a direct count says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DetrImageProcessor
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

from training.finetuning.dense.data import DetectionCollator, SegmentationCollator, detection_transform, segmentation_transform
from training.finetuning.dense.metrics import evaluate_detection, evaluate_segmentation

from .scenes import digit_scenes

MEAN, STD = [0.5] * 3, [0.25] * 3


def _batches(collate, scenes, size=8):
    for start in range(0, len(scenes), size):
        yield collate(scenes[start:start + size])


class _Oracle(torch.nn.Module):
    """Answers each image with the targets the collator produced for it (looked up by pixels)."""

    def __init__(self, batches, shift: float = 0.0):
        super().__init__()
        self.answers = [(b["pixel_values"], b["labels"]) for b in batches]
        self.shift = shift

    def _targets(self, pixel_values):
        for pixels, targets in self.answers:
            if pixels.shape == pixel_values.shape and torch.equal(pixels, pixel_values):
                return targets
        raise AssertionError("unknown batch")


class _DetectionOracle(_Oracle):
    def forward(self, pixel_values):
        targets = self._targets(pixel_values)
        queries, classes = 4, 2
        logits = torch.full((len(targets), queries, classes + 1), -10.0)
        logits[:, :, classes] = 10.0  # unused queries: "no object"
        boxes = torch.full((len(targets), queries, 4), 0.5)
        for i, target in enumerate(targets):
            n = len(target["class_labels"])
            logits[i, :n, :] = -10.0
            logits[i, torch.arange(n), target["class_labels"]] = 10.0
            boxes[i, :n] = target["boxes"] + torch.tensor([self.shift, 0, 0, 0])
        return DetrObjectDetectionOutput(logits=logits, pred_boxes=boxes)


def test_perfect_boxes_score_one_and_shifted_boxes_what_pycocotools_says():
    scenes = digit_scenes(12, seed=3)
    collate = DetectionCollator(detection_transform(48, MEAN, STD, train=False), "image", "objects", num_labels=2)
    batches = list(_batches(collate, scenes))
    processor = DetrImageProcessor(size={"height": 48, "width": 48}, image_mean=MEAN, image_std=STD, do_pad=False)
    perfect = evaluate_detection(_DetectionOracle(batches), batches, processor)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_50"] == pytest.approx(1.0)

    # Shift every box right by a fraction of the image: IoU drops, and so does mAP, by COCO's rules.
    shifted = evaluate_detection(_DetectionOracle(batches, shift=0.05), batches, processor)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for i, scene in enumerate(scenes):
        images.append({"id": i, "width": 48, "height": 48})
        for box, category in zip(scene["objects"]["bbox"], scene["objects"]["category"]):
            x, y, w, h = (v * 48 / 32 for v in box)  # the collator resized 32 px scenes to 48
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
            detections.append({"image_id": i, "category_id": category, "bbox": [x + 0.05 * 48, y, w, h], "score": 1.0})
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 0}, {"id": 1}]}
    truth.createIndex()
    evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert 0.05 < shifted["map"] < 0.95
    assert shifted["map"] == pytest.approx(evaluation.stats[0], abs=1e-6)


class _SegmentationOracle(_Oracle):
    def __init__(self, batches, background_only: bool = False):
        super().__init__(batches)
        self.background_only = background_only

    def forward(self, pixel_values):
        masks = self._targets(pixel_values).clone()
        if self.background_only:
            masks.zero_()
        logits = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
        return type("Output", (), {"logits": logits})()


def test_segmentation_scores_are_mean_iou_over_classes():
    scenes = digit_scenes(10, seed=5)
    collate = SegmentationCollator(segmentation_transform(32, MEAN, STD, train=False), "image", "annotation")
    batches = list(_batches(collate, scenes, size=4))
    perfect = evaluate_segmentation(_SegmentationOracle(batches), batches, num_labels=3)
    assert perfect == {"mean_iou": pytest.approx(1.0), "pixel_accuracy": pytest.approx(1.0)}

    # Everything called background: IoU is background's share for class 0 and 0 for the digits.
    masks = np.stack([np.asarray(scene["annotation"]) for scene in scenes])
    background_iou = (masks == 0).sum() / masks.size
    result = evaluate_segmentation(_SegmentationOracle(batches, background_only=True), batches, num_labels=3)
    assert result["mean_iou"] == pytest.approx(background_iou / 3, abs=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(background_iou, abs=1e-6)


def test_training_transforms_move_boxes_and_masks_with_the_pixels():
    scene = digit_scenes(1, seed=7)[0]
    torch.manual_seed(0)
    collate = DetectionCollator(detection_transform(32, [0.0] * 3, [1.0] * 3, train=True, min_crop_scale=0.6), "image",
                                "objects", num_labels=2)
    batch = collate([scene] * 6)
    for pixels, boxes in zip(batch["pixel_values"], batch["boxes_xyxy"]):
        for x0, y0, x1, y1 in boxes.round().long().tolist():
            inside = pixels[0, y0:y1, x0:x1]
            assert inside.numel() and inside.max() > 0.2  # the digit is where its box went
    collate = SegmentationCollator(segmentation_transform(32, [0.0] * 3, [1.0] * 3, train=True, min_crop_scale=0.6),
                                   "image", "annotation")
    batch = collate([scene] * 6)
    for pixels, mask in zip(batch["pixel_values"], batch["labels"]):
        assert pixels[0][mask > 0].mean() > pixels[0][mask == 0].mean() + 0.3  # digit pixels are labelled
