"""heap.settle(): garbage is collected first (a cycle alive only through itself is not frozen
and kept for ever), then the rest is out of the collector's full walks."""
import gc
import weakref

import pytest

from felix_agent.agent import heap


class Node:
    pass


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the rest of the suite runs with a normal collector


def test_settle_collects_cycles_then_freezes_what_lives(unfrozen):
    garbage = Node()
    garbage.self = garbage  # freed only by the cyclic collector
    dead = weakref.ref(garbage)
    del garbage
    kept = Node()
    kept.self = kept
    frozen = heap.settle()
    assert dead() is None, "a garbage cycle survived settle(): it would be frozen for ever"
    assert frozen == gc.get_freeze_count() > 0
    # what lives now is out of the full collections' walk: counted in the permanent generation
    assert any(o is kept for o in gc.get_objects()) is False
    gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
