"""`TransferAgent`: DistFlow's per-process control plane (Mooncake-transfer-engine shaped).

One agent per process (per TE). It listens for peers, holds the registered memory regions, links to peers
(`connect`: a handshake that checks layouts both ways and learns the peer's incarnation and regions) and
moves bytes (`transfer`: a batch of entries, asynchronous, a handle back).

    agent = TransferAgent("prefill-0", layout)          # listens on 127.0.0.1:<free port>
    agent.register("kv", pool.segment)                  # before peers connect: the handshake lists regions
    peer = agent.connect("127.0.0.1:5555")              # → PeerInfo(name, incarnation, backend, regions)
    h = agent.transfer(peer, entries)                   # push; op=TransferOp.READ pulls
    h.wait(timeout=10.0)                                # raises on failure or timeout

Incarnations: every agent draws a random incarnation id at start. A `connect` that finds a known peer name
under a new incarnation voids the old link (its pending transfers fail with `PeerRestartedError`, its
mappings are dropped); a `PeerInfo` of the old incarnation is refused by `transfer`. Names identify peers
(a TE id): two live agents must not share one.

Regions registered after a peer linked are seen by it when it connects again (the handshake is the only
region announcement); the target side checks every request against its current regions.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from deepflow.flow import messages as m
from deepflow.flow import mooncake_backend
from deepflow.flow.errors import (
    FlowError,
    LayoutMismatchError,
    PeerLostError,
    PeerRestartedError,
)
from deepflow.flow.handle import TransferHandle, TransferOp
from deepflow.flow.layout import LayoutDescriptor
from deepflow.flow.link import Backend, LinkState, PeerInfo, PeerLink, PendingTransfer
from deepflow.flow.regions import MemoryRegion, RegionInfo
from deepflow.flow.shm import ShmSegment
from deepflow.flow.spans import TransferEntry, check_bounds, coalesce, dst_spans, src_spans
from deepflow.flow.target import HANDSHAKE_TIMEOUT, InboundTransfer, Target, TargetHooks, tune

log = logging.getLogger(__name__)

DEFAULT_TRANSFER_TIMEOUT = 30.0  # a transfer's deadline unless the caller gives one


def host_id() -> str:
    """This host as peers compare it for the shared-memory path: hostname + kernel boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be host:port, not {address!r}")
    return host.strip("[]"), int(port)


class TransferAgent:
    def __init__(
        self,
        name: str,
        layout: LayoutDescriptor,
        host: str = "127.0.0.1",
        port: int = 0,
        on_receive: Callable[[InboundTransfer], None] | None = None,
        transfer_timeout: float = DEFAULT_TRANSFER_TIMEOUT,
        mooncake: bool = False,
        advertise: str | None = None,
    ) -> None:
        """Listens on `host`:`port` (0: a free port); `address` is what peers connect to, with `advertise`
        as its host when given (needed when binding 0.0.0.0). `on_receive` runs on the connection's thread
        for every transfer a peer completes here. `transfer_timeout` is the default deadline of a transfer.
        `mooncake=True` also starts this process's Mooncake transfer engine (optional package, see
        `mooncake_backend`) so links may use `Backend.MOONCAKE`; regions are registered with it too."""
        self.name = name
        self.layout = layout
        self.layout_digest = layout.digest()
        self.incarnation = secrets.token_hex(8)
        self.host_id = host_id()
        self.transfer_timeout = transfer_timeout
        self._mooncake = mooncake_backend.engine(advertise or host) if mooncake else None
        self._lock = threading.Lock()
        self._regions: dict[str, MemoryRegion] = {}
        self._links: dict[str, PeerLink] = {}
        self._next_id = 1
        self._closed = False
        hooks = TargetHooks(
            name=name,
            incarnation=self.incarnation,
            refusal=self._refusal,
            welcome=self._welcome,
            peer_seen=self._peer_seen,
            regions=self._region_map,
            on_receive=on_receive,
        )
        self._target = Target(hooks, host, port)
        self.address = f"{advertise or host}:{self._target.port}"

    # -- regions -----------------------------------------------------------------------------------------

    def register(self, name: str, buffers: Any | Sequence[Any]) -> RegionInfo:
        """Register `buffers` (one buffer, or a list laid end to end) as region `name`: torch tensors,
        numpy arrays, bytearrays, mmaps or `ShmSegment`s. The caller keeps them alive and unchanged in
        place; parts inside this process's shared-memory segments are offered to same-host peers."""
        if not isinstance(buffers, list | tuple):
            buffers = [buffers]
        region = MemoryRegion(name, buffers)
        if self._mooncake is not None:
            for part in region.parts:
                if part.size:
                    self._mooncake.register(part.ctypes.data, part.size)
        with self._lock:
            if name in self._regions:
                raise ValueError(f"region {name!r} is already registered")
            self._regions[name] = region
        return region.info()

    def unregister(self, name: str) -> None:
        with self._lock:
            self._regions.pop(name, None)

    def regions(self) -> list[RegionInfo]:
        with self._lock:
            return [r.info() for r in self._regions.values()]

    # -- links -------------------------------------------------------------------------------------------

    def connect(
        self, address: str, backend: Backend = Backend.AUTO, timeout: float = HANDSHAKE_TIMEOUT
    ) -> PeerInfo:
        """Link to the agent at `address` (host:port). Raises `LayoutMismatchError` if either side finds the
        layouts incompatible, `PeerLostError` if it cannot be reached within `timeout`. A peer already
        linked under the same incarnation and backend keeps its link; another backend replaces it (its
        pending transfers fail); a new incarnation voids the old link (`PeerRestartedError`)."""
        host, port = _split_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise PeerLostError(f"cannot reach a DistFlow agent at {address}: {e}") from e
        try:
            tune(sock)
            hello = m.Hello(
                protocol=m.PROTOCOL_VERSION,
                name=self.name,
                incarnation=self.incarnation,
                host_id=self.host_id,
                layout=self.layout,
                layout_digest=self.layout_digest,
                regions=self.regions(),
                mooncake_endpoint=self._mooncake.endpoint if self._mooncake else None,
            )
            sock.sendall(m.frame(hello))
            body, _ = m.recv_frame(sock)
            reply = m.handshake_decoder.decode(body)
        except (OSError, ConnectionError, msgspec.DecodeError) as e:
            sock.close()
            raise PeerLostError(f"handshake with {address} failed: {e}") from e
        if isinstance(reply, m.Refused):
            sock.close()
            err = LayoutMismatchError if reply.reason.startswith("layout mismatch") else FlowError
            raise err(
                f"peer {reply.name!r} (incarnation {reply.incarnation}) at {address} refused the link: "
                f"{reply.reason}"
            )
        if mismatch := self._mismatch(self.layout, reply.layout, reply.layout_digest):
            sock.close()
            raise LayoutMismatchError(
                f"peer {reply.name!r} (incarnation {reply.incarnation}) at {address} has an incompatible "
                f"layout (initiator {self.name!r} != target {reply.name!r}): {mismatch}"
            )
        sock.settimeout(None)
        regions = {r.name: r for r in reply.regions}
        try:
            chosen, segments = self._choose_backend(backend, reply, regions)
        except FlowError:
            sock.close()
            raise
        info = PeerInfo(reply.name, reply.incarnation, address, chosen, reply.layout, regions)
        with self._lock:
            old = self._links.get(info.name)
            keep = (
                old is not None
                and old.state is LinkState.READY
                and old.info.incarnation == info.incarnation
                and old.info.backend is chosen
            )
            if not keep:
                mc = (self._mooncake, reply.mooncake_endpoint) if chosen is Backend.MOONCAKE else None
                self._links[info.name] = PeerLink(sock, info, segments, mc)  # type: ignore[arg-type]
        if keep:
            assert old is not None
            sock.close()  # already linked to this incarnation the same way: keep it (and its transfers)
            for seg in segments.values():
                seg.close()
            return old.info
        if old is not None:
            self._void(old, info.incarnation)
        return info

    def _void(self, old: PeerLink, incarnation: str) -> None:
        """Close a link superseded by a new one to the same peer name; under a new incarnation its pending
        transfers fail with `PeerRestartedError` (else with the plain "closed")."""
        if old.info.incarnation != incarnation:
            old.fail(
                PeerRestartedError(
                    f"peer {old.info.name!r} restarted: incarnation {old.info.incarnation} replaced by "
                    f"{incarnation}; transfers to the old incarnation are void"
                ),
                LinkState.STALE,
            )
        old.close()

    def _peer_seen(self, name: str, incarnation: str) -> None:
        """A peer linked to us (its handshake): if we hold a link to an earlier incarnation of it, that link
        is void now — even before we reconnect, and even if the old process hangs with its socket open."""
        with self._lock:
            old = self._links.get(name)
        if old is not None and old.info.incarnation != incarnation:
            self._void(old, incarnation)  # kept in place, failed: `transfer` to it raises its error

    def _mismatch(self, initiator: LayoutDescriptor, target: LayoutDescriptor, digest: str) -> str:
        """'' when compatible, else each differing field as `name: initiator's != target's`."""
        if digest == self.layout_digest and initiator.digest() == target.digest():
            return ""
        return "; ".join(initiator.mismatches(target)) or "layout digests differ"

    def _choose_backend(
        self, backend: Backend, reply: m.Welcome, regions: dict[str, RegionInfo]
    ) -> tuple[Backend, dict[str, ShmSegment]]:
        if backend is Backend.TCP:
            return Backend.TCP, {}
        if backend is Backend.MOONCAKE:
            if self._mooncake is None or reply.mooncake_endpoint is None:
                side = "this agent" if self._mooncake is None else f"peer {reply.name!r}"
                raise FlowError(
                    f"Mooncake backend unavailable: {side} runs no Mooncake engine (mooncake=True)"
                )
            return Backend.MOONCAKE, {}
        # Shared memory: every region in it is reached in place; under AUTO the others (and everything,
        # when no region is in shm or the peer is elsewhere) go over TCP on the same link.
        shm_regions = [r for r in regions.values() if r.in_shm]
        why = ""
        if reply.host_id != self.host_id:
            why = f"peer is on another host ({reply.host_id})"
        elif not shm_regions:
            why = "no peer region is in shared memory"
        elif backend is Backend.SHM and len(shm_regions) < len(regions):
            why = (
                f"peer regions not in shared memory: {sorted(n for n, r in regions.items() if not r.in_shm)}"
            )
        segments: dict[str, ShmSegment] = {}
        if not why:
            try:
                for r in shm_regions:
                    for p in r.parts:
                        if p.shm_name is not None and p.shm_name not in segments:
                            segments[p.shm_name] = ShmSegment.attach(p.shm_name, p.shm_size)
            except (OSError, ValueError) as e:
                for seg in segments.values():
                    seg.close()
                segments = {}
                why = f"cannot map the peer's segments: {e}"
        if not why:
            return Backend.SHM, segments
        if backend is Backend.SHM:
            raise FlowError(f"shared-memory backend unavailable for peer {reply.name!r}: {why}")
        return Backend.TCP, {}

    def peer(self, name: str) -> PeerInfo | None:
        """The linked peer `name` (its current incarnation), or None if not linked or its link failed."""
        with self._lock:
            link = self._links.get(name)
        return link.info if link is not None and link.state is LinkState.READY else None

    def disconnect(self, name: str) -> None:
        with self._lock:
            link = self._links.pop(name, None)
        if link is not None:
            link.close()

    # -- what the target side asks ------------------------------------------------------------------------

    def _refusal(self, hello: m.Hello) -> str:
        if hello.protocol != m.PROTOCOL_VERSION:
            return f"protocol {hello.protocol} != {m.PROTOCOL_VERSION}"
        if mismatch := self._mismatch(hello.layout, self.layout, hello.layout_digest):
            return f"layout mismatch (initiator {hello.name!r} != target {self.name!r}): {mismatch}"
        return ""

    def _welcome(self) -> m.Welcome:
        return m.Welcome(
            name=self.name,
            incarnation=self.incarnation,
            host_id=self.host_id,
            layout=self.layout,
            layout_digest=self.layout_digest,
            regions=self.regions(),
            mooncake_endpoint=self._mooncake.endpoint if self._mooncake else None,
        )

    def _region_map(self) -> dict[str, MemoryRegion]:
        with self._lock:
            return dict(self._regions)

    # -- data plane --------------------------------------------------------------------------------------

    def transfer(
        self,
        peer: str | PeerInfo,
        entries: Iterable[TransferEntry],
        op: TransferOp = TransferOp.WRITE,
        timeout: float | None = None,
        tag: str = "",
    ) -> TransferHandle:
        """Start moving a batch to (`WRITE`) or from (`READ`) a linked peer; returns at once with a handle.
        For a write, sources are this agent's regions and destinations the peer's; for a read the reverse.
        The batch is checked and coalesced first (`InvalidTransferError` before any byte moves); the
        transfer fails if not acknowledged within `timeout` (default `transfer_timeout`). `tag` is passed
        to the peer's `on_receive`. A `PeerInfo` of an earlier incarnation raises `PeerRestartedError`."""
        name = peer.name if isinstance(peer, PeerInfo) else peer
        with self._lock:
            link = self._links.get(name)
            transfer_id = self._next_id
            self._next_id += 1
        if link is None:
            raise PeerLostError(f"no link to peer {name!r}; connect first")
        if isinstance(peer, PeerInfo) and peer.incarnation != link.info.incarnation:
            raise PeerRestartedError(
                f"peer {name!r} incarnation {peer.incarnation} is gone (now {link.info.incarnation})"
            )
        if link.state is not LinkState.READY:
            assert link.error is not None
            raise link.error
        batch = coalesce(entries)
        local_spans, remote_spans = (
            (src_spans(batch), dst_spans(batch))
            if op is TransferOp.WRITE
            else (dst_spans(batch), src_spans(batch))
        )
        with self._lock:
            local_regions = dict(self._regions)
        check_bounds(local_spans, {n: r.size for n, r in local_regions.items()}, f"agent {self.name!r}")
        check_bounds(remote_spans, {n: r.size for n, r in link.info.regions.items()}, f"peer {name!r}")
        local = [p for s in local_spans for p in local_regions[s.region].pieces(s.offset, s.length)]
        # In place when the bytes can be moved from here (the peer's region mapped, or Mooncake); else
        # they travel on the link's socket (TCP, or an unmapped region of a shm peer).
        remote: list[Any] = []
        if link.info.backend is Backend.MOONCAKE:
            remote = [
                p for s in remote_spans for p in link.remote_addresses(s.region).pieces(s.offset, s.length)
            ]
        elif link.info.backend is Backend.SHM and all(link.mapped(s.region) for s in remote_spans):
            remote = [p for s in remote_spans for p in link.peer_region(s.region).pieces(s.offset, s.length)]
        in_place = bool(remote)
        nbytes = sum(e.length for e in batch)
        handle = TransferHandle(
            transfer_id,
            name,
            link.info.incarnation,
            op,
            nbytes,
            time.monotonic() + (self.transfer_timeout if timeout is None else timeout),
            link.expire,
        )
        if not batch:
            handle._complete()
            return handle
        link.submit(PendingTransfer(handle, remote_spans, local, in_place, remote, tag))
        return handle

    def write(self, peer: str | PeerInfo, entries: Iterable[TransferEntry], **kw: Any) -> TransferHandle:
        return self.transfer(peer, entries, TransferOp.WRITE, **kw)

    def read(self, peer: str | PeerInfo, entries: Iterable[TransferEntry], **kw: Any) -> TransferHandle:
        return self.transfer(peer, entries, TransferOp.READ, **kw)

    def link_state(self, name: str) -> LinkState | None:
        """The state of the link to peer `name` (None: never linked, or dropped)."""
        with self._lock:
            link = self._links.get(name)
        return None if link is None else link.state

    # -- lifetime ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every link (their pending transfers fail), stop listening, drop inbound connections.
        Regions stay the caller's (an `allocate_kv_pool` pool is closed by its owner)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close()
        self._target.close()

    def __enter__(self) -> TransferAgent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
