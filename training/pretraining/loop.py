"""The parts of the pretraining loop: one step with its non-finite policy, and the logged window
of losses and throughput."""

from __future__ import annotations

import logging
import time

import torch
from accelerate import Accelerator

from barlow_cli import CommandFailed

from ..shared.distributed import is_finite_later

__all__ = ["LossWindow", "NonFiniteLosses", "PretrainingStep"]

logger = logging.getLogger(__name__)


class NonFiniteLosses(CommandFailed):
    """Too many non-finite losses in a row: the run cannot go on with these settings."""


class PretrainingStep:
    """One micro-batch through the twin network, its backward pass and, at the end of a
    gradient-accumulation cycle, the optimizer step.

    A non-finite loss skips the step and drops its gradients (and those accumulated with it);
    ``max_non_finite_in_a_row`` of them raise :class:`NonFiniteLosses`.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator,
                 max_non_finite_in_a_row: int = 10) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.max_non_finite_in_a_row = max_non_finite_in_a_row
        self.non_finite_in_a_row = 0

    def __call__(self, view_1: torch.Tensor, view_2: torch.Tensor, step: int):
        """The model's output for views (B, C, H, W) each, or None when the loss was not finite."""
        with self.accelerator.accumulate(self.model):
            out = self.model(pixel_values=view_1, pixel_values_2=view_2)
            loss_is_finite = is_finite_later(out.loss)
            self.accelerator.backward(out.loss)
            # Checked once the backward pass is queued (see is_finite_later). The loss is global,
            # so every process takes the same branch here.
            if not loss_is_finite():
                self.non_finite_in_a_row += 1
                # Through the model, not the optimizer, whose zero_grad accelerate skips between
                # accumulation steps.
                self.model.zero_grad(set_to_none=True)
                logger.warning(f"Non-finite loss at step {step}; step skipped ({self.non_finite_in_a_row} in a row).")
                if self.non_finite_in_a_row >= self.max_non_finite_in_a_row:
                    raise NonFiniteLosses(f"{self.non_finite_in_a_row} non-finite losses in a row at step {step}")
                return None
            self.non_finite_in_a_row = 0
            self.optimizer.step()
            self.optimizer.zero_grad()
        return out


class LossWindow:
    """Losses summed on the device between two logging steps, read once per window.

    An ``.item()`` per step would make the host wait for the device at every step.

    The loss grows with the embedding width D (hundreds to thousands for D = 8192). Two numbers
    read the same at any width: ``c_diagonal_mean`` (mean C_ii, 1 when the views agree) and
    ``c_off_diagonal_mean_square`` (mean C_ij^2 over i != j, 0 without redundancy).
    """

    def __init__(self, embedding_dim: int, global_batch_size: int, accumulation_steps: int) -> None:
        self.off_diagonal_entries = embedding_dim * (embedding_dim - 1) if embedding_dim > 1 else 1
        self.global_batch_size, self.accumulation_steps = global_batch_size, accumulation_steps
        self._reset(wait_seconds=0.0)

    def _reset(self, wait_seconds: float) -> None:
        self.sums: dict[str, torch.Tensor | float] = {"loss": 0.0, "on": 0.0, "off": 0.0, "diagonal": 0.0}
        self.steps = 0
        self.started = time.perf_counter()
        self.wait_at_start = wait_seconds

    def add(self, out) -> None:
        """Add one micro-batch's output (a `BarlowTwinsForPreTrainingOutput`)."""
        for key, value in (("loss", out.loss), ("on", out.on_diagonal_loss), ("off", out.off_diagonal_loss),
                           ("diagonal", out.diagonal_mean)):
            self.sums[key] = self.sums[key] + value.detach()

    def restart_clock(self, wait_seconds: float) -> None:
        """Time the window from now: work between steps that is not training (a monitor) is not
        counted in images/s."""
        self.started = time.perf_counter()
        self.wait_at_start = wait_seconds

    def read(self, wait_seconds: float, learning_rates: list[float]) -> dict[str, float]:
        """The window's metrics, and a new window. ``wait_seconds``: the loader's total wait so far."""
        micro_steps = max(self.steps, 1) * self.accumulation_steps
        elapsed = time.perf_counter() - self.started
        mean = {key: float(value) / micro_steps for key, value in self.sums.items()}
        metrics = {
            "train_loss": mean["loss"],
            "on_diagonal_loss": mean["on"],
            "off_diagonal_loss": mean["off"],
            "c_diagonal_mean": mean["diagonal"],
            "c_off_diagonal_mean_square": mean["off"] / self.off_diagonal_entries,
            "lr_weights": learning_rates[0],
            "lr_biases": learning_rates[1],
            "images_per_second": self.global_batch_size * self.steps / elapsed,
            "data_wait_fraction": (wait_seconds - self.wait_at_start) / elapsed,
        }
        self._reset(wait_seconds)
        return metrics
