"""Optional data path through the Mooncake transfer engine (`mooncake-transfer-engine-non-cuda` on PyPI,
TCP protocol, P2P handshake: no metadata server). Not a dependency: `available()` says whether it can be
used here (the wheel also needs the system's libibverbs.so.1, e.g. Debian's `libibverbs1`).

Mooncake moves the bytes one-sidedly between registered addresses; DistFlow keeps its own handshake
(layouts, incarnations, regions with their addresses) and, after Mooncake's synchronous batch returns,
the same validate-and-acknowledge round trip as the shared-memory path, so completion still means "the
peer incarnation the bytes were meant for has them". A Mooncake call has no timeout of its own: the
handle's deadline bounds the caller's wait, and a link whose transfer passes it is failed.
"""

from __future__ import annotations

import threading
from typing import Any

from deepflow.flow.errors import FlowError

# Requests per Mooncake batch: its TCP transport queues a bounded number per lane and refuses a batch of
# thousands (a KV transfer of scattered blocks) outright.
MAX_BATCH = 128

_lock = threading.Lock()
_engine: MooncakeEngine | None = None


def available() -> bool:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:  # not installed, or its shared libraries are missing
        return False
    return True


class MooncakeEngine:
    """One Mooncake TransferEngine for this process (it is a per-process service: one RPC port)."""

    def __init__(self, host: str) -> None:
        from mooncake.engine import TransferEngine

        self._engine: Any = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise FlowError(f"Mooncake transfer engine failed to initialize on {host} (rc {rc})")
        self.endpoint = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: set[tuple[int, int]] = set()

    def register(self, address: int, size: int) -> None:
        with _lock:
            if (address, size) in self._registered:
                return
            rc = self._engine.register_memory(address, size)
            if rc != 0:
                raise FlowError(f"Mooncake could not register {size} bytes at {address:#x} (rc {rc})")
            self._registered.add((address, size))

    def move(self, write: bool, target: str, local: list[int], remote: list[int], lengths: list[int]) -> None:
        """One synchronous batch; raises `FlowError` naming the target on failure."""
        call = self._engine.batch_transfer_sync_write if write else self._engine.batch_transfer_sync_read
        for i in range(0, len(lengths), MAX_BATCH):
            rc = call(target, local[i : i + MAX_BATCH], remote[i : i + MAX_BATCH], lengths[i : i + MAX_BATCH])
            if rc != 0:
                raise FlowError(f"Mooncake {'write to' if write else 'read from'} {target} failed (rc {rc})")


def engine(host: str) -> MooncakeEngine:
    """This process's engine, started on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = MooncakeEngine(host)
        return _engine
