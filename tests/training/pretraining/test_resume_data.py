"""Resuming an epoch in its middle: the rest of the epoch comes as the uninterrupted loader gave it
(the same examples in the same order, with the same augmentation draws), with or without
DataLoader workers, on one process or as one of several, also after a worker's share ran out.

The stream is made here: integers in 8 shards, so which examples a loader gives is plain to see,
and the "collator" records each batch's ids and one draw of torch's RNG (what an augmentation
would draw)."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch

from training.shared.data import prepare_stream
from training.pretraining.data import PretrainingData

BATCH = 4


def _collate(examples: list[dict]) -> dict:
    return {"ids": [e["img"] for e in examples], "draw": torch.rand(1).item()}


def _data(num_workers: int, process_index: int, num_processes: int) -> PretrainingData:
    table = datasets.Dataset.from_dict({"img": list(range(128))})
    stream = prepare_stream(table, "img", seed=3, shuffle_buffer_size=16, process_index=process_index,
                            num_processes=num_processes)
    return PretrainingData(
        dataset=table, image_column="img", stream=stream, collator=_collate, num_examples=128, is_local=True,
        accelerator=SimpleNamespace(process_index=process_index, device=torch.device("cpu")),
        data_args=SimpleNamespace(dataloader_num_workers=num_workers),
        train_args=SimpleNamespace(seed=3, per_device_train_batch_size=BATCH),
    )


def _epoch(data: PretrainingData, epoch: int, used: int = 0, worker_batches: list[int] | None = None) -> list[dict]:
    torch.manual_seed(0)  # the main process's RNG, as a checkpoint would restore it
    return list(data.make_loader(data.stream, False, epoch, used * BATCH, worker_batches))


def _worker_batches(batches: list[dict]) -> list[int]:
    """What the training loop counts from the batches' "worker" names (None without workers)."""
    counts: list[int] = []
    for batch in batches:
        if "worker" in batch:
            worker, num_workers = batch["worker"]
            counts.extend([0] * (num_workers - len(counts)))
            counts[worker] += 1
    return counts or None


@pytest.mark.parametrize("num_workers, process_index, num_processes", [
    (0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1), (2, 1, 2),
])
def test_a_resumed_epoch_continues_as_the_uninterrupted_one(num_workers, process_index, num_processes):
    data = _data(num_workers, process_index, num_processes)
    full = _epoch(data, epoch=1)
    assert len(full) == 128 // num_processes // BATCH  # every batch whole: no worker's share ends short
    # Odd counts: the loader took one batch more from some workers than from others. The last: with
    # 3 workers over 8 shards (3, 3 and 2 of them), the third worker's share ran out 8 batches ago.
    for used in (1, 3, 5, len(full) - 4):
        rest = _epoch(data, epoch=1, used=used, worker_batches=_worker_batches(full[:used]))
        assert [b["ids"] for b in rest] == [b["ids"] for b in full[used:]], used
        if num_workers:  # in the main process the draws follow its RNG, which a checkpoint restores
            assert [b["draw"] for b in rest] == [b["draw"] for b in full[used:]], used
            assert {b["worker"] for b in full} == {(i, num_workers) for i in range(num_workers)}


def test_without_worker_counts_workers_assume_even_turns():
    # A checkpoint from before the counts were kept: exact until the first worker's share runs out
    # (3 workers over 8 shards of 16: after 24 batches), and after it nothing is missed.
    data = _data(3, 0, 1)
    full = _epoch(data, epoch=1)
    for used in (1, 5, 24):
        assert [b["ids"] for b in _epoch(data, epoch=1, used=used)] == [b["ids"] for b in full[used:]], used
    rest = [i for b in _epoch(data, epoch=1, used=28) for i in b["ids"]]
    assert set(rest) >= {i for b in full[28:] for i in b["ids"]}
    assert len(rest) > len([i for b in full[28:] for i in b["ids"]])  # the gap the counts close


def test_counts_from_another_number_of_workers_are_not_applied():
    # 2 workers counted [3, 2]; with 3 workers the shards are spread otherwise, so the counts would
    # drop the wrong batches: the 3 workers assume even turns instead, exact this early.
    two, three = _data(2, 0, 1), _data(3, 0, 1)
    counts = _worker_batches(_epoch(two, epoch=1)[:5])
    assert counts == [3, 2]
    full = _epoch(three, epoch=1)
    rest = _epoch(three, epoch=1, used=5, worker_batches=counts)
    assert [b["ids"] for b in rest] == [b["ids"] for b in full[5:]]


def test_worker_draws_differ_between_batches_epochs_and_processes():
    first = [b["draw"] for b in _epoch(_data(2, 0, 2), epoch=0)]
    again = [b["draw"] for b in _epoch(_data(2, 0, 2), epoch=0)]
    next_epoch = [b["draw"] for b in _epoch(_data(2, 0, 2), epoch=1)]
    other_process = [b["draw"] for b in _epoch(_data(2, 1, 2), epoch=0)]
    assert first == again  # reproducible
    assert len(set(first)) == len(first)
    assert not set(first) & set(next_epoch) and not set(first) & set(other_process)
