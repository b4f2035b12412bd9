"""EmittedState: the difference engine both Syncers share, and Backoff."""
from felix_agent import model
from felix_agent.datastore.base import Backoff, EmittedState

NS = model.Namespace("x")
POD = model.Pod("x", "a", ips=("10.0.0.1",))


def test_update_emits_only_changes():
    ev = []
    s = EmittedState(ev.append)
    assert s.put(POD) and not s.put(POD)
    assert s.update(("Pod", "x/a"), None) and not s.update(("Pod", "x/a"), None)
    assert ev == [model.Update("Pod", "x/a", POD), model.Update("Pod", "x/a", None)]


def test_replace_orders_and_scopes():
    ev = []
    s = EmittedState(ev.append)
    s.replace({("Pod", "x/a"): POD, ("Namespace", "x"): NS})
    assert [e.kind for e in ev] == ["Namespace", "Pod"]  # namespaces first
    ev.clear()
    pol = model.NetworkPolicy("x", "p")
    s.put(pol)
    ev.clear()
    # A relist of pods only: the policy is out of scope and stays; the namespace too.
    assert s.replace({}, kinds={"Pod"}) == 1
    assert ev == [model.Update("Pod", "x/a", None)]
    ev.clear()
    # Full relist: deletions come pods-before-namespaces (reverse order).
    s.put(POD)
    ev.clear()
    s.replace({})
    assert [e.kind for e in ev] == ["NetworkPolicy", "Pod", "Namespace"]


def test_sync_status_only_on_transitions():
    ev = []
    s = EmittedState(ev.append)
    s.set_in_sync(False, "down")  # before the first sync: reported once
    s.set_in_sync(False, "still down")
    s.set_in_sync(True)
    s.set_in_sync(True)
    s.set_in_sync(False, "lost")
    s.set_in_sync(False, "lost again")
    s.set_in_sync(True)
    assert ev == [model.SyncStatus(False, "down"), model.SyncStatus(True),
                  model.SyncStatus(False, "lost"), model.SyncStatus(True)]


def test_backoff_grows_to_maximum_and_resets():
    b = Backoff(initial=1, maximum=8, factor=2)
    seq = [b.next() for _ in range(6)]
    assert 0.8 <= seq[0] <= 1.2 and 6.4 <= seq[-1] <= 9.6
    assert all(x <= 9.6 for x in seq)
    b.reset()
    assert b.next() <= 1.2
