"""PartitionOffsets: the commit point never passes a record whose stream has not finished."""

from __future__ import annotations

import random

from ai_consumer.offsets import PartitionOffsets


def test_nothing_to_commit_before_any_record() -> None:
    assert PartitionOffsets().committable() is None


def test_commit_stops_at_the_first_unfinished_offset() -> None:
    offsets = PartitionOffsets()
    for o in (10, 11, 12, 13):
        offsets.add(o)
    assert offsets.committable() == 10
    offsets.done(12)
    offsets.done(13)
    assert offsets.committable() == 10  # 10 and 11 still run: committing 14 would lose them
    offsets.done(10)
    assert offsets.committable() == 11
    offsets.done(11)
    assert offsets.committable() == 14  # everything finished: one past the highest seen
    assert len(offsets) == 0


def test_committed_offset_is_not_offered_again() -> None:
    offsets = PartitionOffsets()
    offsets.add(0)
    offsets.done(0)
    assert offsets.committable() == 1
    offsets.committed(1)
    assert offsets.committable() is None
    offsets.add(1)
    assert offsets.committable() is None  # 1 is unfinished and already the commit point
    offsets.done(1)
    assert offsets.committable() == 2


def test_gaps_in_offsets_from_compaction_or_dlq_are_fine() -> None:
    offsets = PartitionOffsets()
    for o in (5, 9, 20):
        offsets.add(o)
    offsets.done(9)
    offsets.done(5)
    assert offsets.committable() == 20
    offsets.done(20)
    assert offsets.committable() == 21


def test_done_twice_or_unknown_offset_is_harmless() -> None:
    offsets = PartitionOffsets()
    offsets.add(3)
    offsets.done(3)
    offsets.done(3)
    offsets.done(99)
    assert offsets.committable() == 4


def test_random_completion_order_never_commits_past_an_unfinished_offset() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        offsets = PartitionOffsets()
        taken = sorted(rng.sample(range(1000), rng.randint(1, 40)))
        for o in taken:
            offsets.add(o)
        unfinished = set(taken)
        order = taken[:]
        rng.shuffle(order)
        for o in order:
            offsets.done(o)
            unfinished.discard(o)
            point = offsets.committable()
            assert point is not None
            # committing `point` tells Kafka every offset below it is done
            assert all(u >= point for u in unfinished), (point, sorted(unfinished))
            if unfinished:
                assert point == min(unfinished)
        assert offsets.committable() == taken[-1] + 1
