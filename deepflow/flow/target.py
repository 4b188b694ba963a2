"""The target side of DistFlow: the listener and the connections peers open to this agent.

Each accepted connection gets one thread: the handshake (refused with the reason when the protocol or
the layout differs; welcomed with this agent's incarnation and regions otherwise), then the initiator's
requests in order. A write is checked against the current regions (incarnation, bounds, payload size),
its payload read straight into the region (TCP) or already there (in place: shm, Mooncake); a read is
answered with the spans' bytes (TCP) or only acknowledged (in place). A refused request is drained and
answered with the reason; the connection stays up. `on_receive` runs before the acknowledgement.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from deepflow.flow import messages as m
from deepflow.flow.errors import InvalidTransferError
from deepflow.flow.handle import TransferOp
from deepflow.flow.regions import MemoryRegion
from deepflow.flow.spans import Span, check_bounds

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
_SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True)
class InboundTransfer:
    """A transfer a peer completed against this agent's regions, as `on_receive` sees it (before the
    acknowledgement is sent: when the peer's handle is done, the callback has run)."""

    peer: str
    peer_incarnation: str
    op: TransferOp
    spans: list[Span]
    tag: str


def tune(sock: socket.socket) -> None:
    """No Nagle delay (acknowledgements are small), large buffers (payloads are not)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)


@dataclass(frozen=True)
class TargetHooks:
    """What the target side needs from its agent, and nothing more."""

    name: str
    incarnation: str
    refusal: Callable[[m.Hello], str]  # '' to accept the peer, else why not
    welcome: Callable[[], m.Welcome]
    peer_seen: Callable[[str, str], None]  # (name, incarnation) of a peer that linked
    regions: Callable[[], dict[str, MemoryRegion]]  # the current regions, a snapshot
    on_receive: Callable[[InboundTransfer], None] | None


class Target:
    """Owns the listening socket and every inbound connection (closed with `close`)."""

    def __init__(self, hooks: TargetHooks, host: str, port: int) -> None:
        self._hooks = hooks
        self._lock = threading.Lock()
        self._inbound: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.create_server((host, port), backlog=64)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"flow-accept-{hooks.name}", daemon=True
        )
        self._acceptor.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            inbound = list(self._inbound)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in inbound:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5.0)

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            tune(sock)
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._inbound.add(sock)
            name = f"flow-serve-{self._hooks.name}"
            threading.Thread(target=self._serve, args=(sock,), name=name, daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        """One initiator's connection: the handshake, then its requests in order until it closes."""
        hooks = self._hooks
        peer = "?"
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            body, _ = m.recv_frame(sock)
            hello = m.request_decoder.decode(body)
            if not isinstance(hello, m.Hello):
                return
            peer = f"{hello.name!r} (incarnation {hello.incarnation})"
            if reason := hooks.refusal(hello):
                log.warning("refusing DistFlow peer %s: %s", peer, reason)
                refused = m.Refused(name=hooks.name, incarnation=hooks.incarnation, reason=reason)
                sock.sendall(m.frame(refused))
                return
            hooks.peer_seen(hello.name, hello.incarnation)  # before the welcome: done when connect returns
            sock.sendall(m.frame(hooks.welcome()))
            sock.settimeout(None)
            while True:
                body, payload_len = m.recv_frame(sock)
                req = m.request_decoder.decode(body)
                if not isinstance(req, m.WriteRequest | m.ReadRequest):
                    raise ConnectionError(f"unexpected {type(req).__name__} after the handshake")
                self._handle(sock, hello, req, payload_len)
        except (OSError, ConnectionError, msgspec.DecodeError) as e:
            log.debug("DistFlow connection from %s ended: %s", peer, e)
        finally:
            with self._lock:
                self._inbound.discard(sock)
            sock.close()

    def _handle(
        self, sock: socket.socket, hello: m.Hello, req: m.WriteRequest | m.ReadRequest, payload_len: int
    ) -> None:
        hooks = self._hooks
        write = isinstance(req, m.WriteRequest)
        nbytes = sum(s.length for s in req.spans)
        regions = hooks.regions()
        error = None
        if req.target_incarnation != hooks.incarnation:
            error = f"addressed to incarnation {req.target_incarnation}, this is {hooks.incarnation}"
        else:
            try:
                check_bounds(req.spans, {n: r.size for n, r in regions.items()}, f"agent {hooks.name!r}")
            except InvalidTransferError as e:
                error = str(e)
        expected = nbytes if write and not req.in_place else 0
        if error is None and payload_len != expected:
            error = f"payload of {payload_len} bytes for {expected}"
        if error is not None:
            m.drain(sock, payload_len)
            sock.sendall(m.frame(m.Ack(transfer_id=req.transfer_id, error=error)))
            return
        # In place, the initiator moved the bytes itself: only TCP needs this side's pieces.
        pieces = (
            []
            if req.in_place
            else [p for s in req.spans for p in regions[s.region].pieces(s.offset, s.length)]
        )
        if write and not req.in_place:
            m.recv_buffers(sock, m.views(pieces))
        if hooks.on_receive is not None:
            try:
                op = TransferOp.WRITE if write else TransferOp.READ
                hooks.on_receive(InboundTransfer(hello.name, hello.incarnation, op, req.spans, req.tag))
            except Exception as e:
                log.exception("on_receive failed")
                error = f"receiver callback failed: {e}"
        if write or req.in_place or error is not None:
            sock.sendall(m.frame(m.Ack(transfer_id=req.transfer_id, error=error)))
        else:
            m.send_buffers(sock, [m.frame(m.Ack(transfer_id=req.transfer_id), nbytes), *m.views(pieces)])
