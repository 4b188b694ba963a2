"""The runner side of the KV connector: this engine's DistFlow agent, the writes it starts, what it received.

The engine's KV pool lives in one shared-memory segment (`flow.allocate_kv_pool`), registered as region "kv"
beside a small control region for notices. One `KVConnectorWorker` per engine, used from two threads:

- the model thread (the runner) starts a prefill request's writes: by request, all its blocks past the
  decode TE's own prefix after its last chunk; by layer, after each layer's K/V write of every chunk, that
  layer's blocks the chunk touched (and, with the first chunk, the prefix this TE had cached). The last write
  of a request carries the count of its writes (see `base`);
- the engine core's thread polls (`poll`): a prefill request's writes done or failed — reported only once no
  DistFlow thread touches its blocks any more (`TransferHandle.quiescent`) — and the decode sinks that hold
  every byte (DistFlow's `on_receive`, on its connection threads, under the lock).

Nothing here decides about a request's life: that is the scheduler side's (`scheduler`), from these reports.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field

from deepflow.engine.kv_connector.base import (
    CTL_BYTES,
    CTL_REGION,
    KV_REGION,
    KVConnectorOutput,
    KVIdentity,
    SendStatus,
    TagKind,
    make_tag,
    parse_tag,
)
from deepflow.engine.kv_transfer import KVMode
from deepflow.engine.request import KVProduceStart
from deepflow.flow import (
    Backend,
    FlowError,
    InboundTransfer,
    KVPoolLayout,
    LayoutDescriptor,
    PeerInfo,
    TransferAgent,
    TransferEntry,
    TransferHandle,
    TransferState,
    allocate_shared,
    kv_block_entries,
)
from deepflow.flow.link import LinkState

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # the handshake with a decode TE, on the model thread


@dataclass
class _Send:
    """One prefill request's writes."""

    start: KVProduceStart
    peer: PeerInfo | None = None
    theirs: KVPoolLayout | None = None
    handles: list[TransferHandle] = field(default_factory=list)
    seq: int = 0  # writes submitted so far
    complete_blocks: int = 0  # leading blocks whose content is final and sent (by layer)
    all_submitted: bool = False
    failed: str = ""
    closed: bool = False  # the runner forgot the request: nothing more is submitted
    reported: bool = False  # its one terminal status went out
    abort_sent: bool = False


@dataclass
class _Receipt:
    """A decode sink's writes seen so far."""

    seqs: set[int] = field(default_factory=set)
    count: int = -1
    aborted: bool = False
    reported_complete: bool = False
    reported_abort: bool = False

    @property
    def complete(self) -> bool:
        return self.count >= 0 and len(self.seqs) == self.count and self.seqs == set(range(self.count))


@dataclass
class StepSend:
    """A prefill request's part of one step: which of its blocks go out, to which of the sink's."""

    request_id: str
    src: list[int]
    dst: list[int]
    last: bool  # this step computes its last prompt chunk
    complete_after: int  # `complete_blocks` once this step is done


class KVConnectorWorker:
    def __init__(
        self,
        name: str,
        layout: LayoutDescriptor,
        pool: KVPoolLayout,
        kv_segment: object,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        backend: str = "auto",
    ) -> None:
        self.pool = pool
        self.backend = Backend(backend)
        self.block_size = layout.block_size
        self.num_layers = layout.num_layers
        self._lock = threading.Lock()
        self._activity = threading.Event()
        self._sends: dict[str, _Send] = {}
        self._receipts: dict[str, _Receipt] = {}  # expected sinks only
        self._peers: dict[str, PeerInfo] = {}  # agent address -> its link
        self._ctl = allocate_shared(CTL_BYTES, "kvctl")
        self.agent = TransferAgent(
            name, layout, host=host, port=port, on_receive=self._on_receive, advertise=advertise
        )
        self.agent.register(KV_REGION, kv_segment)
        self.agent.register(CTL_REGION, self._ctl)
        self.identity = KVIdentity(
            te_id=name, agent_address=self.agent.address, incarnation=self.agent.incarnation
        )

    # ---- prefill side (model thread) ---------------------------------------------------------------
    def start(self, start: KVProduceStart) -> None:
        """A prefill request arrives at the runner: link to its decode TE now (bounded), not mid-step."""
        send = _Send(start)
        with self._lock:
            self._sends[start.request_id] = send
        try:
            send.peer, send.theirs = self._link(start)
        except (FlowError, ValueError) as e:
            with self._lock:
                send.failed = f"cannot reach the decode TE {start.sink.te_id!r}: {e}"

    def _link(self, start: KVProduceStart) -> tuple[PeerInfo, KVPoolLayout]:
        sink = start.sink
        peer = self._peers.get(sink.agent_address)
        if peer is None or peer.incarnation != sink.incarnation or not self._link_ready(peer):
            peer = self.agent.connect(sink.agent_address, backend=self.backend, timeout=CONNECT_TIMEOUT)
            self._peers[sink.agent_address] = peer
        if peer.incarnation != sink.incarnation:
            raise FlowError(
                f"the decode TE restarted (incarnation {peer.incarnation}; the sink is for "
                f"{sink.incarnation})"
            )
        theirs = KVPoolLayout.for_region(self.pool.layout, peer.regions[KV_REGION].size)
        return peer, theirs

    def _link_ready(self, peer: PeerInfo) -> bool:
        return self.agent.link_state(peer.name) is LinkState.READY

    def forget(self, request_id: str) -> None:
        """The runner dropped the request: nothing more is submitted; its decode TE hears of the abort
        unless every write was acknowledged."""
        with self._lock:
            send = self._sends.get(request_id)
            if send is None:
                return
            send.closed = True
        self._maybe_abort(send)

    def plan(self, scheduled: dict[str, int], states: dict) -> list[StepSend]:  # type: ignore[type-arg]
        """The blocks this step's prefill requests send (`states`: the runner's per-request state, before the
        step's tokens are counted in)."""
        bs = self.block_size
        out = []
        with self._lock:
            sends = {rid: s for rid, s in self._sends.items() if rid in scheduled}
        for rid, send in sends.items():
            if send.failed or send.closed or send.all_submitted:
                continue
            state = states[rid]
            prompt_len = len(state.token_ids)  # a prefill request has no output token before its last chunk
            end = state.num_computed_tokens + scheduled[rid]
            last = end >= prompt_len
            local = send.start.sink.num_local_tokens // bs
            if send.start.mode == KVMode.BY_LAYER:
                lo = max(local, send.complete_blocks)
            elif last:
                lo = local
            else:
                continue
            hi = -(-end // bs)
            if lo >= hi:
                continue  # nothing past the decode TE's own prefix yet (the last chunk always has some)
            out.append(
                StepSend(
                    rid,
                    list(state.block_ids[lo:hi]),
                    list(send.start.sink.block_ids[lo:hi]),
                    last,
                    end // bs,
                )
            )
        return out

    def wants_layers(self, plan: list[StepSend]) -> bool:
        with self._lock:
            return any(self._sends[s.request_id].start.mode == KVMode.BY_LAYER for s in plan)

    def after_layer(self, plan: list[StepSend], layer: int) -> None:
        """By layer: layer `layer`'s K/V of this step is written; it leaves now."""
        last_layer = layer == self.num_layers - 1
        for step in plan:
            send = self._sends[step.request_id]
            if send.start.mode == KVMode.BY_LAYER:
                self._submit(send, step, [layer], final=step.last and last_layer)

    def after_forward(self, plan: list[StepSend]) -> None:
        """The step's K/V is written in every layer: by-request sends leave; every plan's bookkeeping."""
        for step in plan:
            send = self._sends[step.request_id]
            if send.start.mode != KVMode.BY_LAYER:
                self._submit(send, step, None, final=True)
            send.complete_blocks = step.complete_after
            if step.last:
                send.all_submitted = True

    def _submit(self, send: _Send, step: StepSend, layers: list[int] | None, final: bool) -> None:
        if send.failed or send.closed:
            return
        assert send.peer is not None and send.theirs is not None
        tag = make_tag(TagKind.DATA, send.start.tag, send.seq, send.seq + 1 if final else -1)
        try:
            entries = kv_block_entries(
                self.pool, KV_REGION, step.src, send.theirs, KV_REGION, step.dst, layers=layers
            )
            handle = self.agent.write(send.peer, entries, tag=tag, timeout=send.start.timeout_s)
        except (FlowError, ValueError) as e:
            with self._lock:
                send.failed = f"write to the decode TE {send.start.sink.te_id!r} failed: {e}"
            return
        with self._lock:
            send.handles.append(handle)
            send.seq += 1

    def _maybe_abort(self, send: _Send) -> None:
        """Tell the decode TE that this reservation gets no more bytes (one byte into its control region,
        after every data write on the link). Best effort: a lost link tells it by itself timing out."""
        with self._lock:
            done = send.all_submitted and all(h.poll() is TransferState.DONE for h in send.handles)
            if send.abort_sent or done or send.peer is None:
                return
            send.abort_sent = True
        entry = TransferEntry(CTL_REGION, 0, CTL_REGION, 0, 1)
        with contextlib.suppress(FlowError):
            self.agent.write(send.peer, [entry], tag=make_tag(TagKind.ABORT, send.start.tag))

    # ---- decode side (DistFlow's threads, and the core's) -------------------------------------------
    def expect(self, sink_ids: list[str]) -> None:
        with self._lock:
            for sink_id in sink_ids:
                self._receipts.setdefault(sink_id, _Receipt())

    def drop(self, sink_ids: list[str]) -> None:
        with self._lock:
            for sink_id in sink_ids:
                self._receipts.pop(sink_id, None)

    def _on_receive(self, inbound: InboundTransfer) -> None:
        parsed = parse_tag(inbound.tag)
        if parsed is None:
            return
        kind, seq, count, sink_id = parsed
        with self._lock:
            receipt = self._receipts.get(sink_id)
            if receipt is None:
                return  # a sink this incarnation no longer (or never) had: its bytes count for nobody
            if kind is TagKind.ABORT:
                receipt.aborted = True
            else:
                receipt.seqs.add(seq)
                if count >= 0:
                    receipt.count = count
        self._activity.set()

    # ---- the core's poll -----------------------------------------------------------------------------
    def poll(self) -> KVConnectorOutput:
        out = KVConnectorOutput()
        aborts = []
        with self._lock:
            for rid, send in list(self._sends.items()):
                if not send.failed:
                    for h in send.handles:
                        if h.poll() is TransferState.FAILED:
                            send.failed = str(h.error)
                            break
                quiet = all(h.quiescent() for h in send.handles)
                if not send.reported:
                    if send.failed and quiet:
                        out.sends[rid] = SendStatus.FAILED
                        out.send_errors[rid] = send.failed
                        send.reported = True
                        aborts.append(send)
                    elif send.all_submitted and all(h.poll() is TransferState.DONE for h in send.handles):
                        out.sends[rid] = SendStatus.DONE
                        send.reported = True
                    elif send.closed and quiet:
                        out.sends[rid] = SendStatus.RELEASED
                        send.reported = True
                if send.reported and send.closed:
                    del self._sends[rid]
            for sink_id, receipt in self._receipts.items():
                if receipt.complete and not receipt.reported_complete:
                    receipt.reported_complete = True
                    out.received.append(sink_id)
                if receipt.aborted and not receipt.reported_abort:
                    receipt.reported_abort = True
                    out.peer_aborted.append(sink_id)
        for send in aborts:
            self._maybe_abort(send)
        return out

    def wait(self, timeout: float) -> None:
        """Sleep until something arrives or `timeout` passes (the core's idle wait, so it never spins)."""
        self._activity.wait(timeout)
        self._activity.clear()

    def empty(self) -> bool:
        with self._lock:
            return not self._sends and not self._receipts

    def close(self) -> None:
        self.agent.close()
        self._ctl.close()
