"""The optional Mooncake data path (TCP protocol): byte-exact both ways between two processes. Skipped
where the package (mooncake-transfer-engine-non-cuda) or its system libraries are missing."""

from __future__ import annotations

import numpy as np
import pytest

from deepflow.flow import Backend, FlowError, TransferAgent, TransferEntry, mooncake_backend
from tests.flow.peer import PeerProcess

pytestmark = pytest.mark.skipif(
    not mooncake_backend.available(), reason="Mooncake transfer engine not installed"
)

WAIT = 30.0


def test_mooncake_write_and_read_are_byte_exact(layout):
    proc = PeerProcess("mc-peer", layout, {"kv": [100_000, 1 << 20]}, shm=False, mooncake=True)
    src = np.random.default_rng(5).integers(0, 256, 1 << 21, dtype=np.uint8)
    back = np.zeros(1 << 21, dtype=np.uint8)
    try:
        with TransferAgent("mc-initiator", layout, mooncake=True) as agent:
            agent.register("src", [src[:4321], src[4321:]])
            agent.register("back", back)
            peer = agent.connect(proc.address, backend=Backend.MOONCAKE)
            assert peer.backend is Backend.MOONCAKE
            entries = [
                TransferEntry("src", 1000, "kv", 50_000, 300_000),
                TransferEntry("src", 0, "kv", 0, 999),
            ]
            agent.write(peer, entries).wait(WAIT)
            expected = proc.initial("kv")
            expected[50_000:350_000] = src[1000:301_000]
            expected[:999] = src[:999]
            assert np.array_equal(proc.read("kv", 0, expected.size), expected)
            agent.read(peer, [TransferEntry("kv", 0, "back", 7, expected.size)]).wait(WAIT)
            assert np.array_equal(back[7 : 7 + expected.size], expected)
    finally:
        proc.close()


def test_mooncake_needs_an_engine_on_both_sides(layout):
    with TransferAgent("plain", layout) as plain, TransferAgent("mc", layout, mooncake=True) as mc:
        with pytest.raises(FlowError, match="runs no Mooncake engine"):
            mc.connect(plain.address, backend=Backend.MOONCAKE)
        with pytest.raises(FlowError, match="this agent runs no Mooncake engine"):
            plain.connect(mc.address, backend=Backend.MOONCAKE)
