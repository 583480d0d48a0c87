"""BucketBatchSampler: one bucket per batch, repeats, determinism and exact resume."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from simpletuner.data.metadata import ImageRecord
from simpletuner.data.sampler import BucketBatchSampler


def _records(dataset: str, count: int, size: tuple[int, int]) -> list[ImageRecord]:
    return [ImageRecord(Path(f"{dataset}/{size[0]}x{size[1]}/{i}.png"), *size, f"c{i}", dataset) for i in range(count)]


def _buckets() -> dict[tuple[int, int], list[ImageRecord]]:
    return {
        (64, 64): _records("a", 7, (64, 64)),
        (96, 64): _records("a", 5, (96, 64)) + _records("b", 2, (96, 64)),
        (64, 96): _records("b", 1, (64, 96)),  # smaller than a batch: never used with drop_last
    }


def _bucket_size_of(record: ImageRecord) -> tuple[int, int]:
    return record.width, record.height


def _paths(batches) -> list[list[str]]:
    return [[str(r.path) for r in batch] for batch in batches]


def test_every_batch_holds_one_bucket_and_epoch_counts() -> None:
    sampler = BucketBatchSampler(_buckets(), batch_size=2, seed=1)
    # (64,64): 7 -> 3 batches; (96,64): 7 -> 3 batches; (64,96): 1 -> 0 batches
    assert sampler.batches_per_epoch() == 6
    assert sampler.dropped_records() == 1
    epoch = list(itertools.islice(sampler, 6))
    assert all(len(batch) == 2 and len({_bucket_size_of(r) for r in batch}) == 1 for batch in epoch)
    used = Counter(r.path for batch in epoch for r in batch)
    assert len(used) == 12 and set(used.values()) == {1}  # 14 usable, one tail dropped per bucket
    assert sampler.state_dict() == {"epoch": 0, "position": 6, "seed": 1}
    assert sampler.epoch_of_next_batch == 1


def test_keep_tail_when_not_drop_last() -> None:
    sampler = BucketBatchSampler(_buckets(), batch_size=2, seed=1, drop_last=False)
    assert sampler.batches_per_epoch() == 9 and sampler.dropped_records() == 0
    epoch = list(itertools.islice(sampler, 9))
    assert sorted(len(b) for b in epoch) == [1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert Counter(r.path for b in epoch for r in b) == Counter(r.path for rs in _buckets().values() for r in rs)


def test_repeats_multiply_appearances_per_epoch() -> None:
    buckets = {(64, 64): _records("a", 3, (64, 64)) + _records("b", 3, (64, 64))}
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=0, repeats={"b": 2})
    assert sampler.batches_per_epoch() == 4  # 3 + 3*3 = 12 samples
    counts = Counter(r.path for batch in itertools.islice(sampler, 4) for r in batch)
    assert {r.path: counts[r.path] for r in buckets[(64, 64)]} == {
        **{r.path: 1 for r in buckets[(64, 64)][:3]},
        **{r.path: 3 for r in buckets[(64, 64)][3:]},
    }


def test_same_seed_same_sequence_different_seed_or_epoch_differs() -> None:
    first = _paths(itertools.islice(BucketBatchSampler(_buckets(), 2, seed=5), 12))
    second = _paths(itertools.islice(BucketBatchSampler(_buckets(), 2, seed=5), 12))
    other = _paths(itertools.islice(BucketBatchSampler(_buckets(), 2, seed=6), 12))
    assert first == second
    assert first != other
    assert first[:6] != first[6:]  # epochs are reshuffled


def test_order_does_not_depend_on_bucket_dict_order() -> None:
    reordered = dict(reversed(list(_buckets().items())))
    assert _paths(itertools.islice(BucketBatchSampler(reordered, 2, seed=3), 6)) == _paths(
        itertools.islice(BucketBatchSampler(_buckets(), 2, seed=3), 6)
    )


@pytest.mark.parametrize("snapshot_after", [4, 5, 6, 7])  # mid-epoch, last batch, epoch boundary, next epoch
def test_resume_continues_exactly(snapshot_after: int) -> None:
    reference = _paths(itertools.islice(BucketBatchSampler(_buckets(), 2, seed=9), 10))

    interrupted = BucketBatchSampler(_buckets(), 2, seed=9)
    head = _paths(itertools.islice(interrupted, snapshot_after))
    state = interrupted.state_dict()

    resumed = BucketBatchSampler(_buckets(), 2, seed=0)  # the saved seed wins
    resumed.load_state_dict(state)
    tail = _paths(itertools.islice(resumed, 10 - snapshot_after))

    assert head + tail == reference
    assert resumed.state_dict() == {"epoch": 1, "position": 4, "seed": 9}


def test_resume_state_values() -> None:
    sampler = BucketBatchSampler(_buckets(), 2, seed=9)
    list(itertools.islice(sampler, 4))
    assert sampler.state_dict() == {"epoch": 0, "position": 4, "seed": 9}
    with pytest.raises(ValueError, match="missing"):
        sampler.load_state_dict({"epoch": 0})


def test_no_possible_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="batch_size=8"):
        BucketBatchSampler(_buckets(), batch_size=8, seed=0)
