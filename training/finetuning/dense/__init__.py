"""Fine-tuning a pretrained encoder for dense tasks: object detection (DETR) and semantic
segmentation (UperNet), run as `barlow-finetune --task object-detection|semantic-segmentation`.

* `arguments.py`: the task's options; the rest are barlow-finetune's, with dense defaults.
* `data.py`: HF-format datasets (image and mask; image and `objects` with `bbox` and
  `category`), their columns and class names, joint image/annotation transforms and collators.
* `models.py`: the DETR or UperNet on the encoder, and its image processor.
* `metrics.py`: mAP (torchmetrics, COCO protocol through pycocotools) and mIoU (torchmetrics).
* `finetune.py`: the Accelerate script.
"""
