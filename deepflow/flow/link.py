"""The initiator's side of one peer connection: a `PeerLink` moves this agent's transfers to one peer
incarnation, over data paths behind the same request/acknowledge protocol:

- TCP: the source bytes follow the request on the socket (gathered writes of the region's own memory); the
  peer reads them straight into its region and acknowledges. A read is the mirror image.
- in place, shared memory (same host): the peer's segments are mapped here and the bytes copied directly
  (one memcpy per coalesced entry piece, no pickling); the request then only asks the peer to validate and
  acknowledge, which also proves it is still the incarnation the bytes were meant for. A batch naming a
  peer region that is not in shared memory takes the TCP path of the same link.
- in place, Mooncake (optional, `mooncake_backend`): its engine moves the bytes, then the same commit.

Two threads per link: the sender takes submitted transfers in order (copies or sends them), the reader
takes acknowledgements (and read payloads) and completes the handles. A link fails once — connection lost,
peer restarted, a deadline passed, closed locally — and every transfer pending on it fails with that error.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from deepflow.flow import messages as m
from deepflow.flow.errors import FlowError, PeerLostError, TransferRejectedError, TransferTimeoutError
from deepflow.flow.handle import TransferHandle, TransferOp
from deepflow.flow.layout import LayoutDescriptor
from deepflow.flow.mooncake_backend import MooncakeEngine
from deepflow.flow.regions import PeerRegion, RegionInfo, RemoteAddresses
from deepflow.flow.shm import ShmSegment
from deepflow.flow.spans import Span

log = logging.getLogger(__name__)

_WATCH_INTERVAL = 0.25  # how often an idle reader looks at the pending deadlines


class Backend(enum.Enum):
    AUTO = "auto"  # shared memory when the peer is on this host and its regions are in shm, else TCP
    SHM = "shm"  # same host: regions in shared memory reached in place (under AUTO, the others over TCP)
    TCP = "tcp"
    MOONCAKE = (
        "mooncake"  # optional, only when asked for: the Mooncake transfer engine (TCP), see mooncake_backend
    )


class LinkState(enum.Enum):
    READY = "ready"
    LOST = "lost"  # connection broke, or the peer stopped answering within a deadline
    STALE = "stale"  # the peer restarted as a new incarnation
    CLOSED = "closed"  # closed by this agent


@dataclass(frozen=True)
class PeerInfo:
    """What the handshake told about a peer; `incarnation` identifies this start of it."""

    name: str
    incarnation: str
    address: str
    backend: Backend  # the data path in use: SHM, TCP or MOONCAKE
    layout: LayoutDescriptor
    regions: dict[str, RegionInfo]


@dataclass
class PendingTransfer:
    handle: TransferHandle
    spans: list[Span]  # the peer's side: destinations of a write, sources of a read
    local: list[np.ndarray]  # this side's pieces: sources of a write, destinations of a read
    in_place: bool  # moved by this side (shm copy, Mooncake), then committed; else sent over TCP
    # The peer's pieces: mapped views (shm) or (address, length) in the peer's process (Mooncake).
    remote: list[np.ndarray] | list[tuple[int, int]] = field(default_factory=list)
    tag: str = ""


def paired_addresses(
    local: list[np.ndarray], remote: list[tuple[int, int]]
) -> tuple[list[int], list[int], list[int]]:
    """(local addresses, remote addresses, lengths) of the chunks where both sides' pieces line up."""
    la, ra, ns = [], [], []
    i = j = li = rj = 0
    while i < len(local) and j < len(remote):
        piece, (address, size) = local[i], remote[j]
        n = min(piece.size - li, size - rj)
        la.append(piece.ctypes.data + li)
        ra.append(address + rj)
        ns.append(n)
        li += n
        rj += n
        if li == piece.size:
            i, li = i + 1, 0
        if rj == size:
            j, rj = j + 1, 0
    return la, ra, ns


def copy_pieces(dst: list[np.ndarray], src: list[np.ndarray]) -> None:
    """Copy the bytes of `src` into `dst` (same total, pieces cut at different places)."""
    i = j = 0
    di = sj = 0  # offsets into dst[i], src[j]
    while i < len(dst) and j < len(src):
        d, s = dst[i], src[j]
        n = min(d.size - di, s.size - sj)
        np.copyto(d[di : di + n], s[sj : sj + n])
        di += n
        sj += n
        if di == d.size:
            i, di = i + 1, 0
        if sj == s.size:
            j, sj = j + 1, 0


class PeerLink:
    def __init__(
        self,
        sock: socket.socket,
        info: PeerInfo,
        segments: dict[str, ShmSegment],
        mooncake: tuple[MooncakeEngine, str] | None = None,
    ) -> None:
        self.info = info
        self._mooncake = mooncake  # (this process's engine, the peer's endpoint) for Backend.MOONCAKE
        self._remote_addresses = (
            {name: RemoteAddresses(r) for name, r in info.regions.items()} if mooncake is not None else {}
        )
        self._sock = sock
        self._segments = segments  # the peer's segments mapped here (shm backend), owned by this link
        self._peer_regions = (
            {name: PeerRegion(r, segments) for name, r in info.regions.items() if r.in_shm}
            if info.backend is Backend.SHM
            else {}
        )
        self._lock = threading.Lock()
        self._state = LinkState.READY
        self._error: FlowError | None = None
        self._pending: dict[int, PendingTransfer] = {}
        self._queue: queue.SimpleQueue[PendingTransfer | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name=f"flow-send-{info.name}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"flow-read-{info.name}", daemon=True)
        self._sender.start()
        self._reader.start()

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def error(self) -> FlowError | None:
        return self._error

    def mapped(self, name: str) -> bool:
        """Whether the peer's region `name` is mapped here (reached in place over shared memory)."""
        return name in self._peer_regions

    def peer_region(self, name: str) -> PeerRegion:
        region = self._peer_regions.get(name)
        if region is None:  # dropped by a failure since the caller checked the state
            raise self._error or PeerLostError(f"peer {self.info.name!r} has no region {name!r}")
        return region

    def remote_addresses(self, name: str) -> RemoteAddresses:
        region = self._remote_addresses.get(name)
        if region is None:
            raise self._error or PeerLostError(f"peer {self.info.name!r} has no region {name!r}")
        return region

    def submit(self, transfer: PendingTransfer) -> None:
        with self._lock:
            if self._state is not LinkState.READY:
                assert self._error is not None
                raise self._error
            self._pending[transfer.handle.transfer_id] = transfer
        self._queue.put(transfer)

    def fail(self, error: FlowError, state: LinkState = LinkState.LOST) -> None:
        """Fail the link once: the socket is shut (unblocking both threads), every pending transfer fails
        with `error`, and the peer's mappings are dropped."""
        with self._lock:
            if self._state is not LinkState.READY:
                return
            self._state, self._error = state, error
            pending = list(self._pending.values())
            self._pending.clear()
        log.info("link to %s (%s) %s: %s", self.info.name, self.info.incarnation, state.value, error)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        for t in pending:
            t.handle._complete(error)
        self._queue.put(None)
        self._release_mappings()

    def _release_mappings(self) -> None:
        """Unmap the peer's segments (a dead peer's pages are freed once swept). A copy still running on
        the sender holds views, which keep the mapping alive (`ShmSegment.close` will not unmap under
        them): it finishes harmlessly and the mapping goes with its last view."""
        self._peer_regions = {}
        segments, self._segments = self._segments, {}
        for seg in segments.values():
            seg.close()

    def expire(self, handle: TransferHandle) -> None:
        """A transfer passed its deadline: the peer stopped answering, so the link goes with it."""
        self.fail(
            TransferTimeoutError(
                f"peer {self.info.name!r} (incarnation {self.info.incarnation}) did not complete transfer "
                f"{handle.transfer_id} before its deadline; the link is closed"
            )
        )

    def close(self, timeout: float = 5.0) -> None:
        self.fail(PeerLostError(f"link to peer {self.info.name!r} closed locally"), LinkState.CLOSED)
        for t in (self._sender, self._reader):
            if t is not threading.current_thread():
                t.join(timeout)
        self._sock.close()
        self._release_mappings()

    # -- sender ------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            t = self._queue.get()
            if t is None:
                break
            h = t.handle
            # Marked busy before the state is checked: a failure after this point completes the handle
            # but leaves it not `quiescent` until this copy or send has stopped touching the memory.
            h._touch(1)
            try:
                if self._state is not LinkState.READY:
                    continue  # failed with the link already: its memory is never touched
                if not self._send_one(t):
                    break
            finally:
                h._touch(-1)
        # drain: whatever was queued behind the failure already failed with the link

    def _send_one(self, t: PendingTransfer) -> bool:
        """Move (in place) or send one transfer; False when the link failed doing so."""
        h = t.handle
        request_cls = m.WriteRequest if h.op is TransferOp.WRITE else m.ReadRequest
        try:
            if t.in_place:  # one-sided: move the bytes here, then commit
                if self._mooncake is not None:
                    engine, endpoint = self._mooncake
                    engine.move(h.op is TransferOp.WRITE, endpoint, *paired_addresses(t.local, t.remote))  # type: ignore[arg-type]
                elif h.op is TransferOp.WRITE:
                    copy_pieces(t.remote, t.local)  # type: ignore[arg-type]
                else:
                    copy_pieces(t.local, t.remote)  # type: ignore[arg-type]
                req = request_cls(
                    transfer_id=h.transfer_id,
                    target_incarnation=self.info.incarnation,
                    spans=t.spans,
                    in_place=True,
                    tag=t.tag,
                )
                self._sock.sendall(m.frame(req))
            else:
                req = request_cls(
                    transfer_id=h.transfer_id,
                    target_incarnation=self.info.incarnation,
                    spans=t.spans,
                    in_place=False,
                    tag=t.tag,
                )
                if h.op is TransferOp.WRITE:
                    m.send_buffers(self._sock, [m.frame(req, h.nbytes), *m.views(t.local)])
                else:
                    self._sock.sendall(m.frame(req))
        except Exception as e:  # a socket error, or a bug: either way the link cannot go on
            self._lost(e)
            return False
        return True

    # -- reader ------------------------------------------------------------------------------------------

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = next((t.handle for t in self._pending.values() if t.handle.deadline <= now), None)
        if expired is not None:
            self.expire(expired)

    def _read_loop(self) -> None:
        sock = self._sock
        try:
            while self._state is LinkState.READY:
                readable, _, _ = select.select([sock], [], [], _WATCH_INTERVAL)
                if not readable:
                    self._check_deadlines()
                    continue
                body, payload_len = m.recv_frame(sock)
                ack = m.ack_decoder.decode(body)
                with self._lock:
                    t = self._pending.get(ack.transfer_id)
                if t is None:
                    if self._state is not LinkState.READY:
                        break
                    raise ConnectionError(f"acknowledgement of unknown transfer {ack.transfer_id}")
                if payload_len:
                    if (
                        ack.error is None
                        and payload_len == t.handle.nbytes
                        and t.handle.op is TransferOp.READ
                    ):
                        t.handle._touch(1)
                        try:
                            m.recv_buffers(sock, m.views(t.local))
                        finally:
                            t.handle._touch(-1)
                    else:
                        m.drain(sock, payload_len)
                        if ack.error is None:
                            ack = m.Ack(transfer_id=ack.transfer_id, error="payload does not match the read")
                with self._lock:
                    self._pending.pop(ack.transfer_id, None)
                if ack.error is None:
                    t.handle._complete()
                else:
                    t.handle._complete(
                        TransferRejectedError(
                            f"peer {self.info.name!r} (incarnation {self.info.incarnation}) refused "
                            f"transfer {ack.transfer_id}: {ack.error}"
                        )
                    )
        except Exception as e:  # connection lost, garbled frame, or a bug: pending transfers must not hang
            self._lost(e)

    def _lost(self, cause: BaseException) -> None:
        if self._state is LinkState.READY:
            self.fail(
                PeerLostError(
                    f"lost the link to peer {self.info.name!r} (incarnation {self.info.incarnation}) at "
                    f"{self.info.address}: {cause or type(cause).__name__}"
                )
            )
