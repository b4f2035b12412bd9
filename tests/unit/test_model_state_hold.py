"""The agent's model held still while the calc reads it on the dataplane thread
(felix_agent.agent.state.ModelState.hold/release): changes that arrive meanwhile wait, in
order, and still count as changes, so the next pass includes them."""
from felix_agent.agent.state import ModelState
from felix_agent.model import Namespace, Pod, Update


def upd(rec) -> Update:
    kind = type(rec).__name__
    return Update(kind, rec.key, rec)


def test_changes_during_a_hold_wait_and_land_in_order():
    st = ModelState()
    st.inject(upd(Namespace("a")))
    gen = st.generation
    st.take_changed_kinds()
    st.hold()
    st.inject(upd(Pod("a", "web", labels=(("v", "1"),))))
    st.inject(upd(Pod("a", "web", labels=(("v", "2"),))))
    assert "a/web" not in st.cluster.pods  # the calc's model does not move under it
    assert st.generation > gen  # a pass after the calc's will include them
    st.release()
    assert st.cluster.pods["a/web"].labels == (("v", "2"),)  # applied in arrival order
    assert "Pod" in st.take_changed_kinds()
    st.inject(upd(Pod("a", "db")))  # released: applied at once again
    assert "a/db" in st.cluster.pods
