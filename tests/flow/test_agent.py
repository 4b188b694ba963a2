"""TransferAgent between two processes: byte-exact pushes and pulls on both backends, the layout refusal,
peer restarts (new incarnation), and hung or killed peers, whose bounded waits raise instead of hanging."""

from __future__ import annotations

import threading

import msgspec
import numpy as np
import pytest

from deepflow.flow import (
    Backend,
    FlowError,
    InboundTransfer,
    InvalidTransferError,
    LayoutDescriptor,
    LayoutMismatchError,
    PeerLostError,
    PeerRestartedError,
    TransferAgent,
    TransferEntry,
    TransferRejectedError,
    TransferState,
    TransferTimeoutError,
    allocate_shared,
    shm,
    sweep_orphans,
    wait_all,
)
from tests.flow.peer import PeerProcess

PEER_REGIONS = {"kv": [300_000, 1 << 20, 77_777]}  # three parts: spans cross part boundaries
LOCAL_SIZE = 1 << 21
WAIT = 20.0  # a bound on every wait, never expected to be reached


@pytest.fixture
def local(layout):
    """The initiator: an agent with region 'src' (random bytes, two parts) and 'dst' (zeros)."""
    agent = TransferAgent("initiator", layout)
    src = np.random.default_rng(7).integers(0, 256, LOCAL_SIZE, dtype=np.uint8)
    dst = np.zeros(LOCAL_SIZE, dtype=np.uint8)
    agent.register("src", [src[:12345], src[12345:]])
    agent.register("dst", dst)
    yield agent, src, dst
    agent.close()


def random_entries(rng, n, src_region, src_size, dst_region, dst_size, max_len=200_000):
    """`n` entries with disjoint destinations (some adjacent, for coalescing) and random sources."""
    lengths = rng.integers(1, max_len, n)
    gaps = rng.integers(0, 3, n) * rng.integers(0, 5000, n)  # a third adjacent
    starts = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
    assert starts[-1] + lengths[-1] <= dst_size
    out = []
    for start, length in zip(starts, lengths, strict=True):
        src = int(rng.integers(0, src_size - length))
        out.append(TransferEntry(src_region, src, dst_region, int(start), int(length)))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("backend", [Backend.TCP, Backend.SHM])
def test_write_and_read_between_processes_are_byte_exact(local, layout, backend):
    agent, src, dst = local
    peer_proc = PeerProcess("peer", layout, PEER_REGIONS, shm=backend is Backend.SHM)
    try:
        peer = agent.connect(peer_proc.address, backend=backend)
        assert peer.backend is backend
        assert peer.incarnation == peer_proc.incarnation
        assert peer.regions["kv"].size == sum(PEER_REGIONS["kv"])
        rng = np.random.default_rng(1)
        expected = peer_proc.initial("kv")
        entries = random_entries(rng, 12, "src", LOCAL_SIZE, "kv", expected.size)
        for e in entries:
            expected[e.dst_offset : e.dst_offset + e.length] = src[e.src_offset : e.src_offset + e.length]
        agent.write(peer, entries).wait(WAIT)
        assert np.array_equal(peer_proc.read("kv", 0, expected.size), expected)

        reads = random_entries(rng, 9, "kv", expected.size, "dst", LOCAL_SIZE)
        want = dst.copy()
        for e in reads:
            want[e.dst_offset : e.dst_offset + e.length] = expected[e.src_offset : e.src_offset + e.length]
        h = agent.read(peer, reads)
        h.wait(WAIT)
        assert h.poll() is TransferState.DONE
        assert np.array_equal(dst, want)
    finally:
        peer_proc.close()
    assert shm.list_segments(peer_proc.pid) == []  # the peer unlinked its segments on close


def test_auto_picks_shm_on_one_host_and_tcp_for_private_memory(local, layout):
    agent, _, _ = local
    for in_shm, expected in ((True, Backend.SHM), (False, Backend.TCP)):
        proc = PeerProcess(f"peer-{in_shm}", layout, {"kv": [4096]}, shm=in_shm)
        try:
            assert agent.connect(proc.address).backend is expected
            if not in_shm:
                with pytest.raises(FlowError, match="no peer region is in shared memory"):
                    agent.connect(proc.address, backend=Backend.SHM)
        finally:
            proc.close()


def test_shm_peer_with_a_private_region_reaches_it_over_tcp(local, layout):
    """AUTO links a same-host peer over shared memory even when only some of its regions are in it: those
    are written in place, the others (and a batch touching both) over the link's socket."""
    agent, src, _ = local
    seg = allocate_shared(1 << 16, "mixed")
    private = np.zeros(1 << 16, dtype=np.uint8)
    try:
        with TransferAgent("mixed", layout) as target:
            target.register("kv", seg)
            target.register("w", private)
            peer = agent.connect(target.address)
            assert peer.backend is Backend.SHM
            agent.write(peer, [TransferEntry("src", 0, "kv", 0, 1000)]).wait(WAIT)
            agent.write(peer, [TransferEntry("src", 1000, "w", 0, 1000)]).wait(WAIT)
            both = [TransferEntry("src", 2000, "kv", 1000, 500), TransferEntry("src", 2500, "w", 1000, 500)]
            agent.write(peer, both).wait(WAIT)
            assert np.array_equal(seg.array[:1500], np.concatenate([src[:1000], src[2000:2500]]))
            assert np.array_equal(private[:1500], np.concatenate([src[1000:2000], src[2500:3000]]))
            agent.disconnect("mixed")
            with pytest.raises(FlowError, match=r"not in shared memory: \['w'\]"):
                agent.connect(target.address, backend=Backend.SHM)
    finally:
        seg.close()


def test_layout_mismatch_is_refused_naming_the_fields(layout):
    other = msgspec.structs.replace(layout, dtype="float16", num_kv_heads=4)
    with TransferAgent("a", layout) as a, TransferAgent("b", other) as b:
        with pytest.raises(LayoutMismatchError) as info:
            a.connect(b.address)
        message = str(info.value)
        assert "dtype: 'bfloat16' != 'float16'" in message
        assert "num_kv_heads: 3 != 4" in message
        assert "'b'" in message
        assert a.peer("b") is None
    extra = msgspec.structs.replace(layout, extra={"weights": "rev2"})
    with (
        TransferAgent("a", layout) as a,
        TransferAgent("b", extra) as b,
        pytest.raises(LayoutMismatchError, match=r"extra\['weights'\]: None != 'rev2'"),
    ):
        a.connect(b.address)


def test_invalid_batches_fail_before_any_byte_moves(local, layout):
    agent, _, _ = local
    with TransferAgent("target", layout) as target:
        target.register("kv", np.zeros(1000, dtype=np.uint8))
        peer = agent.connect(target.address)
        with pytest.raises(InvalidTransferError, match="out of bounds of region 'kv'"):
            agent.write(peer, [TransferEntry("src", 0, "kv", 900, 101)])
        with pytest.raises(InvalidTransferError, match="unknown region 'nope'"):
            agent.write(peer, [TransferEntry("nope", 0, "kv", 0, 1)])
        with pytest.raises(InvalidTransferError, match="overlapping"):
            agent.write(peer, [TransferEntry("src", 0, "kv", 0, 10), TransferEntry("src", 0, "kv", 5, 10)])
        # The target checks again against its current regions: one unregistered since is refused there.
        target.unregister("kv")
        with pytest.raises(TransferRejectedError, match="unknown region 'kv'"):
            agent.write(peer, [TransferEntry("src", 0, "kv", 0, 10)]).wait(WAIT)
        assert agent.peer("target") is not None  # a refusal leaves the link up


def test_on_receive_runs_before_the_acknowledgement(local, layout):
    agent, src, _ = local
    seen: list[InboundTransfer] = []
    dst = np.zeros(4096, dtype=np.uint8)
    with TransferAgent("target", layout, on_receive=seen.append) as target:
        target.register("kv", dst)
        peer = agent.connect(target.address)
        h = agent.write(peer, [TransferEntry("src", 10, "kv", 0, 4096)], tag="req-1")
        h.wait(WAIT)
        assert h.done() and h.poll() is TransferState.DONE and h.error is None
        assert np.array_equal(dst, src[10:4106])
        assert len(seen) == 1
        assert seen[0].peer == "initiator" and seen[0].tag == "req-1"
        assert seen[0].peer_incarnation == agent.incarnation


@pytest.mark.parametrize("backend", [Backend.TCP, Backend.SHM])
def test_hung_peer_bounded_wait_raises_then_deadline_fails_the_link(local, layout, backend):
    agent, _, _ = local
    proc = PeerProcess("hung", layout, {"kv": [1 << 16]}, shm=backend is Backend.SHM)
    try:
        peer = agent.connect(proc.address, backend=backend)
        proc.stop()
        h = agent.write(peer, [TransferEntry("src", 0, "kv", 0, 1 << 16)], timeout=1.0)
        with pytest.raises(TransferTimeoutError, match="still pending"):
            h.wait(0.2)
        with pytest.raises(TransferTimeoutError, match="before its deadline"):
            h.wait(WAIT)  # bounded by the transfer's own deadline
        assert h.poll() is TransferState.FAILED
        assert agent.peer("hung") is None  # the link went with it
        with pytest.raises(TransferTimeoutError):
            agent.write(peer, [TransferEntry("src", 0, "kv", 0, 1)])
    finally:
        proc.kill()
    sweep_orphans()
    assert shm.list_segments(proc.pid) == []


def test_connect_to_a_hung_peer_is_bounded(layout):
    proc = PeerProcess("frozen", layout, {"kv": [4096]})
    try:
        proc.stop()  # the kernel still accepts the connection; the handshake never gets an answer
        with TransferAgent("a", layout) as agent, pytest.raises(PeerLostError, match="handshake"):
            agent.connect(proc.address, timeout=0.5)
    finally:
        proc.kill()
    sweep_orphans()


@pytest.mark.parametrize("backend", [Backend.TCP, Backend.SHM])
def test_killed_peer_fails_in_flight_transfers(local, layout, backend):
    agent, _, _ = local
    proc = PeerProcess("doomed", layout, {"kv": [1 << 16]}, shm=backend is Backend.SHM)
    peer = agent.connect(proc.address, backend=backend)
    proc.stop()  # so the transfer is certainly in flight (unacknowledged) when the peer dies
    h = agent.write(peer, [TransferEntry("src", 0, "kv", 0, 1 << 16)])
    proc.kill()
    with pytest.raises(PeerLostError, match="'doomed'"):
        h.wait(WAIT)
    with pytest.raises(PeerLostError):
        agent.write(peer, [TransferEntry("src", 0, "kv", 0, 1)])
    # The crash left its segments behind; the sweep unlinks them (their owner is gone).
    if backend is Backend.SHM:
        assert shm.list_segments(proc.pid)
        assert set(sweep_orphans()) >= set(proc.segments)
    assert shm.list_segments(proc.pid) == []


@pytest.mark.parametrize("backend", [Backend.TCP, Backend.SHM])
def test_restarted_peer_voids_the_old_incarnation(local, layout, backend):
    agent, src, _ = local
    old = PeerProcess("te-1", layout, {"kv": [1 << 16]}, shm=backend is Backend.SHM, seed=1)
    new = None
    try:
        old_peer = agent.connect(old.address, backend=backend)
        old.stop()  # hung, its connection still open: only the new incarnation can tell us it is gone
        in_flight = agent.write(old_peer, [TransferEntry("src", 0, "kv", 0, 1 << 16)])
        new = PeerProcess("te-1", layout, {"kv": [1 << 16]}, shm=backend is Backend.SHM, seed=2)
        new_peer = agent.connect(new.address, backend=backend)
        assert new_peer.incarnation == new.incarnation != old_peer.incarnation
        with pytest.raises(PeerRestartedError, match=old_peer.incarnation):
            in_flight.wait(WAIT)
        with pytest.raises(PeerRestartedError, match="is gone"):
            agent.write(old_peer, [TransferEntry("src", 0, "kv", 0, 1)])
        assert agent.peer("te-1") == new_peer
        agent.write("te-1", [TransferEntry("src", 100, "kv", 0, 1 << 16)]).wait(WAIT)
        assert np.array_equal(new.read("kv", 0, 1 << 16), src[100 : 100 + (1 << 16)])
    finally:
        old.kill()
        if new is not None:
            new.close()


def test_a_new_incarnation_linking_to_us_voids_our_link_to_the_old_one(local, layout):
    agent, _, _ = local
    old = TransferAgent("te-2", layout)
    try:
        old.register("kv", np.zeros(10, dtype=np.uint8))
        agent.connect(old.address)
        with TransferAgent("te-2", layout) as new:  # te-2 restarted; it links to us first
            new.connect(agent.address)
            assert agent.peer("te-2") is None
            with pytest.raises(PeerRestartedError, match=new.incarnation):
                agent.write("te-2", [TransferEntry("src", 0, "kv", 0, 1)])
    finally:
        old.close()


def test_concurrent_submitters_share_one_link(local, layout):
    agent, src, _ = local
    dst = allocate_shared(1 << 20, "concurrent")
    errors: list[BaseException] = []
    try:
        with TransferAgent("target", layout) as target:
            target.register("kv", dst)
            peer = agent.connect(target.address, backend=Backend.TCP)

            def submit(k: int) -> None:
                try:
                    for i in range(8):
                        off = (k * 8 + i) * 4096
                        agent.write(peer, [TransferEntry("src", off, "kv", off, 4096)]).wait(WAIT)
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            # Many in flight at once, completed in order on the one link.
            handles = [agent.write(peer, [TransferEntry("src", i, "kv", 500_000 + i, 1)]) for i in range(64)]
            wait_all(handles, WAIT)
        assert not errors
        assert np.array_equal(dst.array[500_000:500_064], src[:64])
        assert np.array_equal(dst.array[: 32 * 4096], src[: 32 * 4096])
    finally:
        dst.close()


def test_close_fails_pending_and_later_transfers(local, layout):
    agent, _, _ = local
    with TransferAgent("target", layout) as target:
        target.register("kv", np.zeros(10, dtype=np.uint8))
        peer = agent.connect(target.address)
        agent.disconnect("target")
        with pytest.raises(PeerLostError, match="no link"):
            agent.write(peer, [TransferEntry("src", 0, "kv", 0, 1)])
        assert agent.peer("target") is None
        again = agent.connect(target.address)  # a fresh link to the same incarnation
        assert again.incarnation == peer.incarnation
        agent.write(again, [TransferEntry("src", 0, "kv", 0, 10)]).wait(WAIT)


def test_connect_to_nobody_raises(layout):
    with TransferAgent("a", layout) as a:
        b = TransferAgent("b", layout)
        address = b.address
        b.close()
        with pytest.raises(PeerLostError, match="cannot reach"):
            a.connect(address, timeout=2.0)


def test_layout_fixture_is_consistent(layout: LayoutDescriptor):
    assert layout.digest() == LayoutDescriptor(**msgspec.structs.asdict(layout)).digest()
