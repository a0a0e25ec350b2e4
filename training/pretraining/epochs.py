"""The pretraining loop's batches: epoch after epoch, resumable, agreed across processes, and
never stuck.

Each process reads its own shard of the stream. Before a batch is used, the processes agree on
three things in one reduction: whether every process still has a batch (streams end at
different points), whether every batch holds two or more readable images (the loss standardises
over the batch), and whether any process was asked to stop (SIGTERM, Ctrl-C). Data that cannot
give a step (an epoch without a usable batch, or many unusable batches in a row) ends the run
with a message instead of looping forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

import datasets
from accelerate import Accelerator

from barlow_cli import CommandFailed

from ..shared.checkpointing import TrainerState
from ..shared.collate import whole_batches
from ..shared.distributed import all_processes
from .signals import StopRequests

__all__ = ["TrainingBatches", "MAX_UNUSABLE_BATCHES_IN_A_ROW"]

logger = logging.getLogger(__name__)

# An endless stream of unreadable images has no epoch end to notice: stop after this many.
MAX_UNUSABLE_BATCHES_IN_A_ROW = 100


class TrainingBatches:
    """Iterate over collated batches ``{"pixel_values", "pixel_values_2", "num_skipped"}`` with at
    least two readable images each, from where ``state`` stands (its epoch and the examples of
    that epoch already consumed), updating ``state`` as they are taken.

    The iteration ends only when a stop was requested on any process, at an optimizer-step
    boundary (every ``accumulation_steps`` batches); ``stopped_by`` then names the signal. It
    raises ``CommandFailed`` when the data cannot give a step.

    Args:
        stream: this process's share, with ``set_epoch`` (``datasets.IterableDataset``).
        make_loader: ``(stream, persistent, epoch, skipped_examples, worker_batches)`` -> the
            collated batches of ``batch_size`` of the epoch, after its first ``skipped_examples``
            (when resuming it; ``worker_batches[i]`` of them came from worker ``i``). A batch from a
            worker names it under ``"worker"`` as ``(worker id, number of workers)``.
        on_epoch_end: called after each complete epoch (before the next one is read), e.g. to
            save an epoch checkpoint.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        make_loader: Callable[[datasets.IterableDataset, bool, int, int, list[int]], Iterable[dict]],
        batch_size: int,
        accelerator: Accelerator,
        state: TrainerState,
        stop: StopRequests,
        *,
        accumulation_steps: int = 1,
        persistent_workers: bool = False,
        on_epoch_end: Callable[[], None] | None = None,
    ) -> None:
        self.stream, self.make_loader, self.batch_size = stream, make_loader, batch_size
        self.accelerator, self.state, self.stop = accelerator, state, stop
        self.accumulation_steps, self.persistent_workers = accumulation_steps, persistent_workers
        self.on_epoch_end = on_epoch_end
        self.stopped_by: str | None = None
        self.wait_seconds = 0.0  # time spent waiting for the loader, for the data_wait_fraction metric
        self._epoch_loader: Iterable[dict] | None = None
        self._yielded = 0
        self._unusable_in_a_row = 0
        # (worker id, number of workers) of the loader batches read since the last batch taken
        self._pulled_from: list[tuple[int, int]] = []

    def _loader(self) -> Iterable[dict]:
        """The loader over the rest of this epoch: a one-off one when resuming in its middle."""
        if self.state.examples_in_epoch:
            return self.make_loader(self.stream, False, self.state.epoch, self.state.examples_in_epoch,
                                    list(self.state.worker_batches))
        self.stream.set_epoch(self.state.epoch)
        if self._epoch_loader is None:
            # Workers live for the whole run: datasets shares set_epoch with them, so each epoch
            # is still reshuffled.
            self._epoch_loader = self.make_loader(self.stream, self.persistent_workers, self.state.epoch, 0, [])
        return self._epoch_loader

    def _next(self, batches: Iterator[dict], at_boundary: bool) -> dict | None:
        if self.stop.requested and at_boundary:
            return None  # stopping: read nothing more (a worker may have died of the same signal)
        started = time.perf_counter()
        try:
            return next(batches, None)
        except RuntimeError:
            if self.stop.requested:  # the loader's workers were stopped by the same signal
                return None
            raise
        finally:
            self.wait_seconds += time.perf_counter() - started

    def __iter__(self) -> Iterator[dict]:
        while True:
            resumed_mid_epoch = self.state.examples_in_epoch > 0
            batches = whole_batches(self._noting_workers(self._loader()), self.batch_size)
            taken = usable = 0
            while True:
                at_boundary = self._yielded % self.accumulation_steps == 0
                batch = self._next(batches, at_boundary)
                has_batch = batch is not None
                enough = has_batch and batch["pixel_values"].shape[0] >= 2
                every_has, every_enough, none_stops = all_processes(
                    self.accelerator, has_batch, enough, not self.stop.requested
                )
                if not none_stops and at_boundary:
                    self.stopped_by = self.stop.signal_name or "a signal to another process"
                    return
                if not every_has:
                    break
                taken += 1
                self.state.examples_in_epoch += self.batch_size
                self._count_workers()
                self.state.skipped_images += int(batch["num_skipped"])
                if not every_enough:
                    self._unusable()
                    continue
                self._unusable_in_a_row = 0
                usable += 1
                self._yielded += 1
                yield batch
            if usable == 0 and not resumed_mid_epoch:
                # (A checkpoint saved after an epoch's last batch leaves nothing of that epoch to read.)
                what = f"no batch of {self.batch_size} images" if taken == 0 else (
                    f"no batch with two or more readable images ({self.state.skipped_images} images skipped "
                    "as unreadable so far)")
                raise CommandFailed(f"Epoch {self.state.epoch} gave {what}. Check the data or lower "
                                    "--per_device_train_batch_size.")
            self.state.epoch += 1
            self.state.examples_in_epoch = 0
            self.state.worker_batches, self._pulled_from = [], []
            if self.on_epoch_end is not None:
                self.on_epoch_end()

    def _noting_workers(self, loader: Iterable[dict]) -> Iterator[dict]:
        for batch in loader:
            if "worker" in batch:
                self._pulled_from.append(batch.pop("worker"))
            yield batch

    def _count_workers(self) -> None:
        """Count the loader batches behind the batch taken against their workers, for a resume.
        (Rows of a worker's short last batch still waiting in whole_batches count as taken.)"""
        counts = self.state.worker_batches
        for worker, num_workers in self._pulled_from:
            counts.extend([0] * (num_workers - len(counts)))  # one count per worker, so the length says how many
            counts[worker] += 1
        self._pulled_from.clear()

    def _unusable(self) -> None:
        self._unusable_in_a_row += 1
        if self._unusable_in_a_row == 1:
            logger.warning("Skipping a batch with fewer than two readable images.")
        if self._unusable_in_a_row >= MAX_UNUSABLE_BATCHES_IN_A_ROW:
            raise CommandFailed(
                f"{self._unusable_in_a_row} batches in a row had fewer than two readable images "
                f"({self.state.skipped_images} images skipped as unreadable so far): the data cannot train a model. "
                "Check the image column and the files."
            )
