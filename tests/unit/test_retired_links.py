"""RetiredLinkReaper's scheduling (felix_agent/dataplane/retired_links.py), without root: `reap` is a
recording function standing in for podnet.plumbing.reap_retired (the kernel side is
tested in tests/integration/test_plumbing_rtnl.py and test_cni_async_del.py)."""
import asyncio
import concurrent.futures
import threading

from felix_agent.dataplane.retired_links import RetiredLinkReaper


class Kernel:
    """Counts reap calls; `pending` links are "retired" until a reap deletes them."""

    def __init__(self, block: threading.Event | None = None):
        self.calls = 0
        self.pending = 0
        self.block = block
        self.fail = False

    def reap(self) -> int:
        if self.block is not None:
            self.block.wait(5)
        self.calls += 1
        if self.fail:
            raise OSError(16, "busy")
        n, self.pending = self.pending, 0
        return n


def run(coro):
    return asyncio.run(coro)


def test_retirements_within_the_window_share_one_reap():
    k = Kernel()

    async def main():
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            r = RetiredLinkReaper(k.reap, ex, window=0.05)
            for _ in range(10):
                k.pending += 1
                r.notify()
            await asyncio.sleep(0.3)
            return r.reaped
    assert run(main()) == 10
    assert k.calls == 1


def test_a_retirement_during_a_reap_gets_another_reap():
    gate = threading.Event()
    k = Kernel(block=gate)

    async def main():
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            r = RetiredLinkReaper(k.reap, ex, window=0.0)
            k.pending = 1
            r.notify()
            await asyncio.sleep(0.05)  # the first reap is now blocked in the "kernel"
            k.pending += 1
            r.notify()  # must not be lost although a run is in progress
            gate.set()
            await r.flush()
            return r.reaped
    assert run(main()) == 2
    assert k.pending == 0
    assert k.calls >= 2


def test_flush_reaps_without_a_notify_and_waits():
    k = Kernel()
    k.pending = 3  # left behind before the agent started

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            r = RetiredLinkReaper(k.reap, ex)
            await r.flush()
            return r.reaped
    assert run(main()) == 3


def test_a_failing_reap_is_logged_and_retried_on_the_next_notify(caplog):
    k = Kernel()

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            r = RetiredLinkReaper(k.reap, ex, window=0.0)
            k.pending, k.fail = 2, True
            r.notify()
            await asyncio.sleep(0.1)
            assert k.pending == 2 and r.reaped == 0
            k.fail = False
            r.notify()
            await asyncio.sleep(0.1)
            return r.reaped
    assert run(main()) == 2
    assert "could not delete retired links" in caplog.text
