"""The asynchronous result of a transfer: poll it, or wait on it with a bound.

A handle is completed exactly once, by its link: DONE when the peer acknowledged it, FAILED with the error
that explains why (peer lost or restarted, refused, deadline passed). Every handle also has a deadline set
when it was submitted; a wait past it fails the transfer (and its link: a peer that stopped answering
cannot be trusted with the next one), so no caller can hang on a silent peer.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable

from deepflow.flow.errors import FlowError, TransferTimeoutError


class TransferOp(enum.Enum):
    WRITE = "write"  # push: local source → peer destination
    READ = "read"  # pull: peer source → local destination


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransferHandle:
    def __init__(
        self,
        transfer_id: int,
        peer: str,
        incarnation: str,
        op: TransferOp,
        nbytes: int,
        deadline: float,
        on_expired: Callable[[TransferHandle], None],
    ) -> None:
        self.transfer_id = transfer_id
        self.peer = peer
        self.incarnation = incarnation  # the peer's incarnation this transfer is bound to
        self.op = op
        self.nbytes = nbytes
        self.deadline = deadline  # time.monotonic() past which the transfer fails
        self._on_expired = on_expired
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._state = TransferState.PENDING
        self._error: FlowError | None = None
        # Threads of the link touching this transfer's local memory right now (a copy, a send, a receive).
        # A handle fails at once when its link does, but a copy already running finishes after that: the
        # owner of the memory may reuse it only once the handle is `quiescent`.
        self._touching = 0

    @property
    def error(self) -> FlowError | None:
        return self._error

    def poll(self) -> TransferState:
        """The state now (without blocking); a pending transfer past its deadline fails here."""
        if self._state is TransferState.PENDING and time.monotonic() >= self.deadline:
            self._on_expired(self)
        return self._state

    def done(self) -> bool:
        """True once completed, successfully or not (`wait` tells which)."""
        return self.poll() is not TransferState.PENDING

    def quiescent(self) -> bool:
        """Completed, and no thread of DistFlow will read or write this transfer's local memory again (a
        failed transfer's copy may still be running when the handle fails): the memory may be reused."""
        with self._lock:
            # DONE: the peer acknowledged, so every byte already left (or reached) the local memory — the
            # sender may not have stepped out of its bracket yet, but it touches nothing any more.
            return self._state is TransferState.DONE or (
                self._state is TransferState.FAILED and self._touching == 0
            )

    def _touch(self, delta: int) -> None:
        """The link's threads bracket every access to the local memory with +1 / -1."""
        with self._lock:
            self._touching += delta

    def wait(self, timeout: float) -> None:
        """Block until complete, at most `timeout` seconds (and never past the deadline). Returns on
        success; raises the transfer's error on failure, `TransferTimeoutError` if still pending."""
        end = min(time.monotonic() + timeout, self.deadline)
        self._event.wait(max(end - time.monotonic(), 0.0))
        if self.poll() is TransferState.PENDING:
            raise TransferTimeoutError(
                f"transfer {self.transfer_id} ({self.op.value}, {self.nbytes} bytes) to peer {self.peer!r} "
                f"(incarnation {self.incarnation}) still pending after {timeout:.3g}s"
            )
        if self._error is not None:
            raise self._error

    def _complete(self, error: FlowError | None = None) -> bool:
        """Called by the link (once; later calls are ignored). Returns whether this call completed it."""
        with self._lock:
            if self._state is not TransferState.PENDING:
                return False
            self._error = error
            self._state = TransferState.DONE if error is None else TransferState.FAILED
        self._event.set()
        return True

    def __repr__(self) -> str:
        return f"TransferHandle({self.transfer_id}, {self.op.value}, peer={self.peer!r}, {self._state.value})"


def wait_all(handles: Iterable[TransferHandle], timeout: float) -> None:
    """Wait for every handle within one overall bound; raises the first failure or timeout met."""
    end = time.monotonic() + timeout
    for h in handles:
        h.wait(max(end - time.monotonic(), 0.0))
