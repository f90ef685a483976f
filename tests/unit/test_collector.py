"""FrozenSurvivors: the survivors of a full collection are frozen, and everything is thawed in time."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from broker.ops.collector import FrozenSurvivors, Step

T0 = 1_000.0


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    # No automatic collection meanwhile (another thread's allocations could start one): the
    # tests run every collection themselves.
    gc.disable()
    gc.unfreeze()
    yield
    gc.unfreeze()  # the process's collector as the other tests expect it
    gc.enable()


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


def test_nothing_happens_without_a_full_collection() -> None:
    collector = FrozenSurvivors(thaw_every=60, now=T0)
    assert collector.step(T0 + 1) is Step.IDLE
    assert gc.get_freeze_count() == 0


def test_the_survivors_of_a_full_collection_are_frozen_once() -> None:
    collector = FrozenSurvivors(thaw_every=60, now=T0)
    kept = [Node() for _ in range(100)]
    gc.collect()
    assert collector.step(T0 + 1) is Step.FROZEN
    frozen = gc.get_freeze_count()
    assert frozen >= len(kept)
    assert collector.step(T0 + 2) is Step.IDLE and gc.get_freeze_count() == frozen


def test_young_garbage_is_collected_before_anything_is_frozen() -> None:
    collector = FrozenSurvivors(thaw_every=60, now=T0)
    gc.collect()
    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage  # a cycle nobody references, not yet collected
    assert gone() is not None
    assert collector.step(T0 + 1) is Step.FROZEN
    assert gone() is None


def test_a_frozen_object_that_becomes_a_cycle_is_collected_after_the_thaw() -> None:
    collector = FrozenSurvivors(thaw_every=60, now=T0)
    node = Node()
    gone = weakref.ref(node)
    gc.collect()
    assert collector.step(T0 + 1) is Step.FROZEN
    del node
    gc.collect()
    assert gone() is not None  # frozen: the collector does not look at it
    gc.collect()
    assert collector.step(T0 + 61) is Step.THAWED and gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None
