"""The collapse monitor: RankMe, the effective rank of the embeddings of a held-out batch.

RankMe (Garrido, Balestriero, Najman and LeCun, "RankMe: Assessing the downstream performance of
pretrained self-supervised representations by their rank", ICML 2023) is the exponential of the
entropy of the normalised singular values of an (N, D) embedding matrix:

    p_k = sigma_k / sum_j sigma_j + eps,    RankMe = exp(-sum_k p_k log p_k),    eps = 1e-7.

It lies between 1 (every embedding on one line: complete collapse) and min(N, D) (all singular
values equal), needs no labels, and in the paper it tracks downstream accuracy within a method.
A run whose RankMe falls towards 1 is collapsing, whatever its loss says.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, create_image_processor

from ..shared.collate import decode_image
from ..shared.model_source import processor_transform
from .monitor import held_out_examples


__all__ = ["RANKME_EPSILON", "RankMeMonitor", "rankme"]

logger = logging.getLogger(__name__)

RANKME_EPSILON = 1e-7  # the paper's


def rankme(embeddings: torch.Tensor, epsilon: float = RANKME_EPSILON) -> float:
    """RankMe of `embeddings` (N, D): exp of the entropy of its singular values normalised to sum
    to 1 (plus `epsilon`, as in the paper). Computed in float64; the rows are not centred."""
    if embeddings.ndim != 2 or min(embeddings.shape) == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) matrix, got shape {tuple(embeddings.shape)}")
    singular_values = torch.linalg.svdvals(embeddings.detach().to(device="cpu", dtype=torch.float64))
    # All-zero embeddings have no direction at all; every p_k is then epsilon (RankMe ~ 1).
    p = singular_values / singular_values.sum().clamp_min(torch.finfo(torch.float64).tiny) + epsilon
    return math.exp(-(p * p.log()).sum().item())


@dataclass
class RankMeMonitor:
    """RankMe of the encoder's features (`rankme`) and of the projector's outputs
    (`rankme_projections`) on one held-out batch, at every logging step. Runs on the main process.

    Attributes:
        pixel_values: (N, C, S, S), the batch as the model's image processor prepares it (no
            augmentation), so successive values compare the same images.
        threshold: log a warning when `rankme` falls below it, and at the last step if it ends
            below it (0: never). A freshly initialised network may start below: the mean of its
            features (after a ReLU, all positive) dominates the singular values until it learns,
            so starting low is not a warning.
        source: "held-out" (the dataset's validation or test split) or "training".
    """

    accelerator: Accelerator
    pixel_values: torch.Tensor
    threshold: float
    source: str
    _was_above: bool = False  # some earlier value was at or above the threshold
    _warned: bool = False  # warned since the last value at or above it

    @classmethod
    def create(
        cls, data_args, image_column: str, config: BarlowTwinsConfig, accelerator: Accelerator, num_samples: int,
        threshold: float,
    ) -> "RankMeMonitor | None":
        """Decode the first `num_samples` held-out images (from `image_column`, as in training) once;
        None (with a warning) if fewer than two are readable."""
        examples, source = held_out_examples(data_args, image_column, num_samples)
        mode = "RGB" if config.num_channels == 3 else "L"
        images = [decode_image(example[image_column], mode) for example in examples]
        transform = processor_transform(create_image_processor(config))
        pixels = [transform(image) for image in images if image is not None]
        if len(pixels) < 2:
            logger.warning("The collapse monitor found fewer than two readable images; RankMe is not logged.")
            return None
        if source == "training":
            logger.info("No validation or test split: RankMe is measured on the first training images.")
        return cls(accelerator, torch.stack(pixels), threshold, source)

    @torch.no_grad()
    def measure(self, model: BarlowTwinsForPreTraining, step: int, last: bool = False) -> dict[str, float]:
        """{"rankme": ..., "rankme_projections": ...} for the model now (an empty dict on other
        processes than the main one). The model is in eval mode for the measurement only.
        `last`: the run's last step, where a value below the threshold warns in any case."""
        values: dict[str, float] = {}
        if self.accelerator.is_main_process:
            was_training = model.training
            model.eval()
            try:
                with self.accelerator.autocast():
                    out = model(pixel_values=self.pixel_values.to(self.accelerator.device))
            finally:
                model.train(was_training)
            values = {"rankme": rankme(out.pooler_output.flatten(1)), "rankme_projections": rankme(out.projections)}
            self.accelerator.log(values, step=step)
            logger.info(f"step {step}: RankMe {values['rankme']:.1f} (encoder), {values['rankme_projections']:.1f} (projector)")
            self._check(values["rankme"], step, last, most=min(self.pixel_values.shape[0], out.pooler_output.shape[1]))
        self.accelerator.wait_for_everyone()
        return values

    def _check(self, value: float, step: int, last: bool, most: int) -> None:
        if value >= self.threshold:
            self._was_above, self._warned = True, False
            return
        if self._warned or not (self._was_above or last):
            return
        self._warned = True
        how = "fell" if self._was_above else "ended"
        logger.warning(
            f"step {step}: the encoder's RankMe {how} to {value:.1f}, below --rankme_warning_threshold "
            f"{self.threshold:g} (at most {most} here): its embeddings collapse onto few directions. Lower the "
            f"learning rates; for a Vision Transformer use AdamW (benchmarks/configs/vit_adamw.yaml) rather than LARS."
        )
