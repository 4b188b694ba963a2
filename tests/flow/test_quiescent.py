"""A handle fails the moment its link does, but a copy already running still touches the local memory: its
owner may reuse that memory only once the handle is `quiescent` (the KV connector frees blocks on that)."""

from __future__ import annotations

import threading

import numpy as np

from deepflow.flow import TransferAgent, TransferEntry, TransferState, allocate_shared, link

WAIT = 20.0  # a bound on every wait, never expected to be reached


def test_a_failed_transfer_is_not_quiescent_while_its_copy_runs(layout, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_copy = link.copy_pieces

    def slow_copy(dst, src):  # type: ignore[no-untyped-def]
        started.set()
        assert release.wait(WAIT)
        real_copy(dst, src)

    monkeypatch.setattr(link, "copy_pieces", slow_copy)
    src = np.arange(1 << 16, dtype=np.uint8)
    with TransferAgent("target", layout) as target, TransferAgent("initiator", layout) as agent:
        seg = allocate_shared(1 << 16)
        try:
            target.register("kv", seg)
            agent.register("src", src)
            peer = agent.connect(target.address)
            h = agent.write(peer, [TransferEntry("src", 0, "kv", 0, 1 << 16)], timeout=WAIT)
            assert started.wait(WAIT)  # the sender is inside the in-place copy
            agent.close()  # the link fails: the handle completes at once...
            assert h.poll() is TransferState.FAILED
            assert not h.quiescent()  # ...but its memory is still being read
            release.set()
            for _ in range(2000):
                if h.quiescent():
                    break
                threading.Event().wait(0.01)
            assert h.quiescent()
        finally:
            release.set()
            seg.close()


def test_done_and_empty_transfers_are_quiescent(layout):
    src = np.arange(4096, dtype=np.uint8)
    with TransferAgent("target", layout) as target, TransferAgent("initiator", layout) as agent:
        target.register("kv", np.zeros(4096, dtype=np.uint8))
        agent.register("src", src)
        peer = agent.connect(target.address)
        h = agent.write(peer, [TransferEntry("src", 0, "kv", 0, 4096)])
        h.wait(WAIT)
        assert h.quiescent()
        assert agent.write(peer, []).quiescent()
        assert agent.link_state("target") is not None
