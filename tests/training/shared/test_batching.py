"""whole_batches: short batches (one per loader worker and epoch) merged into whole ones, every
example kept once, in a stream of batches made here."""

from __future__ import annotations

import pytest
import torch

from training.shared.collate import whole_batches


def _batch(ids: list[int], skipped: int = 0) -> dict:
    """A two-view batch whose rows carry their example ids (both views), with ``skipped`` unreadable
    examples; an all-unreadable batch has shape (0,) as a worker's first collation gives it."""
    if not ids:
        return {"pixel_values": torch.empty(0), "pixel_values_2": torch.empty(0), "num_skipped": skipped}
    rows = torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return {"pixel_values": rows, "pixel_values_2": rows + 0.5, "num_skipped": skipped}


def _ids(batch: dict) -> list[int]:
    return [int(v) for v in batch["pixel_values"][:, 0, 0, 0]] if len(batch["pixel_values"]) else []


def test_whole_batches_pass_through_and_short_ones_merge():
    # Three workers, batch 4, 23 examples: worker 0 gives 4+4+2, worker 1 gives 4+3 (2 of the 3
    # unreadable), worker 2 gives 4+2 (one of its first 4 unreadable).
    stream = [
        _batch([0, 1, 2, 3]), _batch([10, 11, 12, 13]), _batch([20, 21, 22], skipped=1),
        _batch([4, 5, 6, 7]), _batch([14], skipped=2), _batch([23, 24]), _batch([8, 9]),
    ]
    total = sum(len(_ids(b)) + b["num_skipped"] for b in stream)
    out = list(whole_batches(stream, 4))
    assert len(out) == total // 4 == 5  # drop_last on the workers' batches would give 4
    for batch in out:
        assert len(batch["pixel_values"]) + batch["num_skipped"] == 4
        torch.testing.assert_close(batch["pixel_values_2"], batch["pixel_values"] + 0.5)
    # Whole batches come as they were; the short ones fill the rest, and fewer than 4 are left over.
    assert [_ids(b) for b in out[:4]] == [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22], [4, 5, 6, 7]]
    assert _ids(out[4]) == [14, 23] and out[4]["num_skipped"] == 2
    used = [i for b in out for i in _ids(b)]
    assert len(used) == len(set(used))
    everything = {i for b in stream for i in _ids(b)}
    assert set(used) <= everything and total - 4 * len(out) < 4
    assert sum(b["num_skipped"] for b in out) == 3  # every skipped example is counted once


@pytest.mark.parametrize("batch_size", [3, 5, 8])
def test_whole_batches_match_chunking_the_examples(batch_size):
    # Short batches only (a worker per batch), some all-unreadable: what comes out are the examples
    # in arrival order, cut into chunks of batch_size, with the remainder left out.
    torch.manual_seed(batch_size)
    stream, examples, next_id = [], [], 0
    for _ in range(12):
        size = int(torch.randint(0, batch_size, ()))
        skipped = int(torch.randint(0, size + 1, ()))
        ids = list(range(next_id, next_id + size - skipped))
        next_id += size
        stream.append(_batch(ids, skipped))
        examples += [("skip", None)] * skipped + [("id", i) for i in ids]
    out = list(whole_batches(stream, batch_size))
    assert len(out) == len(examples) // batch_size
    for batch in out:
        assert len(batch["pixel_values"]) + batch["num_skipped"] == batch_size
    readable = [i for kind, i in examples if kind == "id"]
    got = [i for b in out for i in _ids(b)]
    assert got == readable[: len(got)]  # the order of arrival is kept
    assert sum(b["num_skipped"] for b in out) + len(got) == batch_size * len(out)
