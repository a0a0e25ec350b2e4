"""Barlow Twins two-view augmentation (the BYOL recipe): the one home of the paper's parameters.

Two interchangeable implementations draw from the same distributions:

* CPU path (:class:`TwoViewTransform`), for DataLoader workers: PIL image -> two normalised float
  views. Per view: torchvision's random-resized crop on uint8, then one conversion to float32 and
  flip, colour jitter, grayscale, blur, solarisation and normalisation in place on the crop
  (:class:`_CpuView`), written for one thread: few, cheap tensor ops and no per-op dispatch.
* Device path: :class:`TwoViewCropTransform` only crops on the CPU (uint8 out), then
  :class:`TwoViewBatchAugmentation` / :class:`BatchedViewAugmentation` do flip, colour, blur,
  solarise and normalisation on whole batches (CPU or CUDA), with per-sample random parameters.

Both paths work in float32 after the crop, with no rounding between ops, and share the colour
and blur formulas (torchvision's float ops); the distributions are identical.
"""


from .cpu import SupervisedTrainTransform, TwoViewCropTransform, TwoViewTransform, supervised_train_transform
from .device import AugmentationDraw, BatchedViewAugmentation, TwoViewBatchAugmentation
from .params import BARLOW_TWINS_VIEW1, BARLOW_TWINS_VIEW2, BICUBIC, ViewAugmentationParams, barlow_twins_view_params

__all__ = [
    "ViewAugmentationParams",
    "BARLOW_TWINS_VIEW1",
    "BARLOW_TWINS_VIEW2",
    "BICUBIC",
    "barlow_twins_view_params",
    "TwoViewTransform",
    "TwoViewCropTransform",
    "AugmentationDraw",
    "BatchedViewAugmentation",
    "TwoViewBatchAugmentation",
    "SupervisedTrainTransform",
    "supervised_train_transform",
]
