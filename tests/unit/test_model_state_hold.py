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


def test_a_waiting_request_makes_the_loop_program_before_taking_more_events():
    """waited_for(): a CNI request waits for a change already in the model, so the loop runs
    that pass before it drains a burst of queued datastore events (AgentLoop.run_loop)."""
    import asyncio

    async def go():
        st = ModelState()
        st.inject(upd(Pod("a", "web")))
        assert not st.waited_for()  # a change, but nobody waits for it
        waiter = asyncio.create_task(st.wait_programmed(st.generation))
        await asyncio.sleep(0)
        assert st.waited_for()
        await st.programmed(st.generation)
        await waiter
        assert not st.waited_for()  # programmed, and the waiter is gone
    asyncio.run(go())
