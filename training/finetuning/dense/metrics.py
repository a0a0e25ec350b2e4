"""Evaluating dense models with library metrics: mAP (torchmetrics' MeanAveragePrecision, the COCO
protocol through pycocotools) and mIoU (torchmetrics' multiclass Jaccard index, averaged over
classes). Over several processes, torchmetrics gathers every process's share."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["evaluate_detection", "evaluate_segmentation"]


def _missing_metrics() -> ImportError:
    return ImportError(
        "Dense evaluation needs torchmetrics and pycocotools: pip install -e \".[dense]\" "
        "(or pip install torchmetrics pycocotools)."
    )


def _predictions(model: nn.Module, loader: Iterable[dict], device: torch.device, accelerator) -> Iterator[tuple[dict, Any]]:
    """(batch, model output) for every non-empty batch of `loader`, the model in eval mode (its
    mode restored afterwards). ValueError when a lone process saw no readable image: with several,
    another process may hold the split's images, and torchmetrics gathers them."""
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in loader:
            pixel_values = batch["pixel_values"]
            if pixel_values.shape[0] == 0:
                continue
            with accelerator.autocast() if accelerator is not None else nullcontext():
                outputs = model(pixel_values=pixel_values.to(device))
            seen += len(pixel_values)
            yield batch, outputs
    finally:
        model.train(was_training)
    if seen == 0 and (accelerator is None or accelerator.num_processes == 1):
        raise ValueError("The evaluation split has no readable images.")


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: Iterable[dict], processor, *, accelerator=None) -> dict[str, float]:
    """COCO mAP of a DETR over `loader` (DetectionCollator batches): every query's best class and
    score, boxes from the processor's `post_process_object_detection` at the input's size."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError:
        raise _missing_metrics() from None
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools").to(device)
    for batch, outputs in _predictions(model, loader, device, accelerator):
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        size = tuple(batch["pixel_values"].shape[-2:])
        found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[size] * len(outputs.logits))
        metric.update(
            [{"boxes": f["boxes"], "scores": f["scores"], "labels": f["labels"]} for f in found],
            [{"boxes": boxes.to(device), "labels": target["class_labels"].to(device)}
             for boxes, target in zip(batch["boxes_xyxy"], batch["labels"])],
        )
    result = metric.compute()
    return {name: float(result[name]) for name in ("map", "map_50", "map_75", "mar_100")}


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, loader: Iterable[dict], num_labels: int, ignore_index: int = 255, *, accelerator=None
) -> dict[str, float]:
    """Mean IoU over classes and pixel accuracy of a segmentation model over `loader`
    (SegmentationCollator batches), at the input's resolution; `ignore_index` pixels left out."""
    try:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
    except ImportError:
        raise _missing_metrics() from None
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    iou = MulticlassJaccardIndex(num_classes=num_labels, average="macro", ignore_index=ignore_index).to(device)
    accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro", ignore_index=ignore_index).to(device)
    for batch, outputs in _predictions(model, loader, device, accelerator):
        logits, size = outputs.logits, batch["pixel_values"].shape[-2:]
        if logits.shape[-2:] != size:
            logits = nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        predictions, labels = logits.argmax(1), batch["labels"].to(device)
        iou.update(predictions, labels)
        accuracy.update(predictions, labels)
    return {"mean_iou": float(iou.compute()), "pixel_accuracy": float(accuracy.compute())}
