"""A DistFlow agent in a child process (multiprocessing spawn), driven over a pipe by the tests.

The child registers regions filled with seeded random bytes — in shared memory (one segment per region,
its parts slices of it) or in private numpy arrays — and answers a few commands: read back bytes, close.
Every wait on it is bounded (`Connection.poll`), so a stuck child fails the test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from deepflow.flow import LayoutDescriptor

REPLY_TIMEOUT = 30.0


def region_bytes(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _main(
    conn: Connection,
    name: str,
    layout: LayoutDescriptor,
    regions: dict[str, list[int]],
    shm: bool,
    seed: int,
    mooncake: bool,
) -> None:
    from deepflow.flow import TransferAgent, allocate_shared

    agent = TransferAgent(name, layout, mooncake=mooncake)
    segments = []
    views: dict[str, np.ndarray] = {}
    for i, (rname, parts) in enumerate(sorted(regions.items())):
        total = sum(parts)
        if shm:
            seg = allocate_shared(total, rname)
            segments.append(seg)
            whole = seg.array
        else:
            whole = np.zeros(total, dtype=np.uint8)
        whole[:] = region_bytes(seed + i, total)
        bounds = np.cumsum([0, *parts])
        agent.register(rname, [whole[bounds[j] : bounds[j + 1]] for j in range(len(parts))])
        views[rname] = whole
    conn.send(("ready", agent.address, agent.incarnation, [s.name for s in segments]))
    while True:
        cmd, *args = conn.recv()
        if cmd == "read":
            rname, offset, length = args
            conn.send(bytes(views[rname][offset : offset + length]))
        elif cmd == "close":
            agent.close()
            for seg in segments:
                seg.close()
            conn.send("closed")
            return


def orphan_segment(conn: Connection) -> None:
    """Allocate a segment, say its name, and wait to be killed without closing it (a crash)."""
    from deepflow.flow import allocate_shared

    seg = allocate_shared(4096, "orphan")
    conn.send(seg.name)
    conn.recv()


class PeerProcess:
    def __init__(
        self,
        name: str,
        layout: LayoutDescriptor,
        regions: dict[str, list[int]],
        shm: bool = True,
        seed: int = 0,
        mooncake: bool = False,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_main, args=(child, name, layout, regions, shm, seed, mooncake), daemon=True
        )
        self.proc.start()
        child.close()
        status, self.address, self.incarnation, self.segments = self._reply()
        assert status == "ready"
        self.seed = seed
        self.regions = regions

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def _reply(self) -> Any:
        if not self.conn.poll(REPLY_TIMEOUT):
            raise TimeoutError("peer process did not answer")
        return self.conn.recv()

    def initial(self, region: str) -> np.ndarray:
        """The bytes `region` started with."""
        index = sorted(self.regions).index(region)
        return region_bytes(self.seed + index, sum(self.regions[region]))

    def read(self, region: str, offset: int, length: int) -> np.ndarray:
        self.conn.send(("read", region, offset, length))
        return np.frombuffer(self._reply(), dtype=np.uint8)

    def close(self) -> None:
        self.conn.send(("close",))
        assert self._reply() == "closed"
        self.proc.join(REPLY_TIMEOUT)

    def stop(self) -> None:
        """SIGSTOP, returning once the child is stopped (the signal is delivered asynchronously: a request
        sent right after `kill` could still be answered). waitpid(WUNTRACED) reports the stop; it runs in
        a thread so the wait is bounded."""
        os.kill(self.pid, signal.SIGSTOP)
        waiter = threading.Thread(target=os.waitpid, args=(self.pid, os.WUNTRACED), daemon=True)
        waiter.start()
        waiter.join(REPLY_TIMEOUT)
        assert not waiter.is_alive(), "the peer did not stop"

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.join(REPLY_TIMEOUT)  # reaped: its pid is no longer alive for `sweep_orphans`
