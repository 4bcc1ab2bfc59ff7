"""The schedules of faults: deterministic per seed, and two faults at once only where they can
both hold."""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nemesis import KINDS, NETWORK_KINDS, overlapping, schedule  # noqa: E402


def test_a_seed_gives_the_same_schedule():
    assert list(itertools.islice(schedule(3, 3, 4), 40)) == \
        list(itertools.islice(schedule(3, 3, 4), 40))
    assert list(itertools.islice(overlapping(3, 3, 4), 40)) == \
        list(itertools.islice(overlapping(3, 3, 4), 40))


def test_overlapping_pairs_only_faults_that_can_hold_together():
    for seed in range(20):
        for first, second, offset in itertools.islice(overlapping(seed, 3, 4), 60):
            if second is None:
                continue
            assert "restart" not in (first.kind, second.kind)
            assert not (first.kind in NETWORK_KINDS and second.kind in NETWORK_KINDS)
            assert 0.0 <= offset <= first.hold_s


def test_overlapping_loses_no_fault_of_the_schedule():
    # Every fault of the plain schedule is used, in pairs or alone; none is dropped.
    steps = list(itertools.islice(overlapping(11, 5, 4), 200))
    used = Counter(f.kind for first, second, _ in steps for f in (first, second) if f)
    assert set(used) == set(KINDS)
    plain = Counter(f.kind for f in itertools.islice(schedule(11, 5, 4), sum(used.values())))
    # Faults set aside for a later step may still be waiting at the end: a handful at most.
    assert sum((plain - used).values()) <= len(NETWORK_KINDS)


def test_network_faults_alone_are_steps_of_one():
    steps = list(itertools.islice(overlapping(5, 3, 4, kinds=NETWORK_KINDS), 10))
    assert all(second is None for _, second, _ in steps)
