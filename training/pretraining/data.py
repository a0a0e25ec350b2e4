"""The pretraining data of one process: its shard of the stream, the two views, the loaders, and
the dataset's size for the schedule.

    dataset -> prepare_stream (this process's shard, undecoded) -> DataLoader(TwoViewCollator) ->
    to_views (to the device; colour, blur and solarisation there with --augment_on_device)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, get_worker_info
from torchvision.transforms import v2

from barlow_cli import UsageError
from modeling_barlow import BarlowTwinsConfig

from ..arguments import DataArguments, PretrainingArguments
from ..shared.augment import TwoViewBatchAugmentation, TwoViewCropTransform, TwoViewTransform
from ..shared.collate import TwoViewCollator
from ..shared.data import count_examples, is_local_source, load_image_dataset, prepare_stream, resolve_image_column
from .signals import ignore_interrupts

__all__ = ["PretrainingData", "ResumableCollate", "load_pretraining_data"]

logger = logging.getLogger(__name__)


@dataclass
class PretrainingData:
    """What the loop needs of the data.

    Attributes:
        stream: this process's shard of the training split (``set_epoch`` before every epoch).
        collator: undecoded examples -> ``{"pixel_values", "pixel_values_2"}`` (B, C, H, W) each,
            and ``"num_skipped"`` (unreadable images left out).
        num_examples: the split's size (after ``--max_train_samples``), or None when unknown.
        is_local: whether the data came from this machine rather than the hub.
    """

    dataset: Any
    image_column: str
    stream: datasets.IterableDataset
    collator: TwoViewCollator
    num_examples: int | None
    is_local: bool
    accelerator: Accelerator
    data_args: DataArguments
    train_args: PretrainingArguments
    device_augment: TwoViewBatchAugmentation | None = None
    memory_format: torch.memory_format = torch.contiguous_format

    def make_loader(
        self, stream: datasets.IterableDataset, persistent: bool, epoch: int, skipped_examples: int = 0,
        worker_batches: list[int] | None = None,
    ) -> Iterable[dict]:
        """The collated batches of ``stream``'s epoch ``epoch``, after the first ``skipped_examples``
        (a resumed epoch: a multiple of the batch size), of which ``worker_batches[i]`` batches came
        from worker ``i``; ``persistent`` keeps the workers between epochs. A batch from a worker
        names it under ``"worker"`` as ``(worker id, number of workers)``."""
        batch_size, workers = self.train_args.per_device_train_batch_size, self.data_args.dataloader_num_workers
        stream.set_epoch(epoch)
        collate = ResumableCollate(
            self.collator, self.train_args.seed, self.accelerator.process_index, batch_size, skipped_examples,
            worker_batches,
        )
        loader = DataLoader(
            stream, batch_size=batch_size, collate_fn=collate,
            # Short batches are kept and merged by whole_batches: each worker ends an epoch with one.
            num_workers=workers, drop_last=False, persistent_workers=persistent,
            pin_memory=self.accelerator.device.type == "cuda",  # lets to_views copy without blocking
            worker_init_fn=ignore_interrupts,
            # Its own generator: creating the loader must not draw from the global RNG, or a resumed
            # run's augmentations would differ from an uninterrupted one's.
            generator=torch.Generator().manual_seed(self.train_args.seed + epoch),
        )
        return _UnusedBatches(loader) if skipped_examples else loader

    def to_views(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> the two model inputs (B, C, H, W) on the device, augmented there if asked."""
        device = self.accelerator.device
        view_1 = batch["pixel_values"].to(device, non_blocking=True)
        view_2 = batch["pixel_values_2"].to(device, non_blocking=True)
        if self.device_augment is not None:
            with torch.no_grad():
                view_1, view_2 = self.device_augment(view_1, view_2)
        return view_1.contiguous(memory_format=self.memory_format), view_2.contiguous(memory_format=self.memory_format)


class ResumableCollate:
    """The collator of the pretraining loader: when resuming an epoch, the batches already used come
    back as ``None``, read but not decoded; in DataLoader workers, torch's RNG is seeded before each
    batch from (seed, process, epoch, worker, the worker's batch number in the epoch), and the batch
    names its worker under ``"worker"``: ``(worker id, number of workers)``.

    The stream's ``skip()`` cannot resume an epoch exactly: it fixes the order of the shards (so
    after epoch 0 it reads them in another order than the epoch had), datasets splits the count
    evenly over the workers (the loader takes batches from them in turn), and once the stream is
    split by process not at all (each worker skips the whole count). So a resumed loader reads the
    whole epoch and drops what was used: in the main process its first ``k = skipped_examples /
    batch_size`` batches, in worker ``i`` its first ``worker_batches[i]`` (counted by the loop from
    the ``"worker"`` names). Without counts (a checkpoint from before they were kept), worker ``i``
    of the ``W`` that have shards assumes even turns, ``k // W + (i < k % W)``: exact until the
    first worker's share of the epoch runs out. So does a run resumed with another number of
    workers, whose counts no longer apply (the shards are spread otherwise): only approximately,
    as many batches but not the same ones. A worker's RNG is not in a checkpoint (accelerate
    saves the main process's, which the main process's collation draws from), hence the seeding.
    """

    def __init__(self, collator: Callable[[list[dict]], dict], seed: int, process_index: int, batch_size: int,
                 skipped_examples: int = 0, worker_batches: list[int] | None = None) -> None:
        self.collator, self.seed, self.process_index = collator, seed, process_index
        self.used_batches = skipped_examples // batch_size
        self.worker_batches = list(worker_batches or [])
        self._epoch: int | None = None
        self._batch = 0
        self._skip_until = self.used_batches  # the main process's loader is for one epoch

    def _used_by(self, worker_id: int, num_workers: int, num_shards: int) -> int:
        if not self.used_batches:
            return 0
        if len(self.worker_batches) == num_workers:  # counted by a run with as many workers
            return self.worker_batches[worker_id]
        with_data = min(num_workers, num_shards)
        return self.used_batches // with_data + (worker_id < self.used_batches % with_data)

    def __call__(self, examples: list[dict]) -> dict | None:
        worker = get_worker_info()
        if worker is not None:
            epoch = worker.dataset.epoch
            if epoch != self._epoch:  # persistent workers see every epoch; the batch numbers restart
                self._epoch, self._batch = epoch, 0
                self._skip_until = self._used_by(worker.id, worker.num_workers, worker.dataset.num_shards)
        number, self._batch = self._batch, self._batch + 1
        if number < self._skip_until:
            return None
        if worker is None:
            return self.collator(examples)
        key = [self.seed, self.process_index, self._epoch, worker.id, number]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]))
        return {**self.collator(examples), "worker": (worker.id, worker.num_workers)}


class _UnusedBatches:
    """A resumed epoch's loader, less the ``None`` its collation returns for the batches already used."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict]:
        return (batch for batch in self.loader if batch is not None)


def load_pretraining_data(
    data_args: DataArguments, train_args: PretrainingArguments, config: BarlowTwinsConfig, accelerator: Accelerator
) -> PretrainingData:
    """Load the training split, this process's shard of it, and the two views' transforms."""
    dataset = load_image_dataset(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_split,
        data_args.train_dir, data_args.streaming, data_args.cache_dir,
    )
    try:
        image_column = resolve_image_column(dataset, data_args.image_column)
    except ValueError as error:  # the fix is an option: --image_column
        raise UsageError(str(error)) from None
    stream = prepare_stream(
        dataset, image_column, seed=train_args.seed, shuffle_buffer_size=data_args.shuffle_buffer_size,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        max_samples=data_args.max_train_samples,
    )
    interpolation = v2.InterpolationMode(config.interpolation)
    view_params = train_args.view_params()
    device_augment = None
    if train_args.augment_on_device:
        transform = TwoViewCropTransform(config.image_size, config.num_channels, interpolation, view_params)
        device_augment = TwoViewBatchAugmentation(config.image_mean, config.image_std, view_params).to(accelerator.device)
    else:
        transform = TwoViewTransform(
            config.image_size, config.image_mean, config.image_std, config.num_channels, interpolation, view_params
        )
    is_local = is_local_source(data_args.dataset_name, data_args.train_dir)
    num_examples = count_examples(dataset, data_args.train_split)
    if num_examples is None and is_local:
        # Local files that record no size (parquet, imagefolder streams): one pass of undecoded reads,
        # so that epochs (and the paper's warm-up in epochs) resolve.
        logger.info("Counting the training examples (the dataset records no size)...")
        num_examples = sum(1 for _ in prepare_stream(dataset, image_column, shuffle=False))
    if num_examples is not None and data_args.max_train_samples:
        num_examples = min(num_examples, data_args.max_train_samples)
    return PretrainingData(
        dataset, image_column, stream, TwoViewCollator(transform, image_column, config.num_channels), num_examples,
        is_local, accelerator, data_args, train_args, device_augment,
        torch.channels_last if train_args.channels_last else torch.contiguous_format,
    )
