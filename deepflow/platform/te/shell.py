"""The task-executor shell (paper §4.1, Figure 2): one FlowServe engine made a member of the cluster.

It serves the engine's core loop (`run_core_loop`) to any number of job executors over one ROUTER socket:
each JE says Hello, then sends engine commands; outputs go back to the JE that sent the request, while the
step's stats and cache-residency events go to every JE (each keeps a load view and a prompt tree). Every
second it reports to the cluster manager who it is, where it listens and its load; the CM's StopTE (or
SIGTERM, or the launcher going away) stops it after the current step.

Prefill/decode disaggregation (engine/kv_transfer.py): a TE started with `kv_transfer` runs a DistFlow agent
named after it; a KVConsume request answers at once with an output carrying its `KVSink` (to the JE that
sent it), a KVProduce request streams its first token then finishes with `kv_transferred`, and the JEs'
`KVPrefilled` commands go to the engine core like aborts. The KV itself never passes through here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback

import msgspec
import zmq

from deepflow.engine.config import EngineConfig
from deepflow.engine.core_client import AddRequest, Command, Shutdown, run_core_loop
from deepflow.engine.request import EngineCoreOutput, EngineCoreOutputs
from deepflow.platform import messages as m

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0


def _kv_agent_defaults(config: EngineConfig, te_id: str, address: str) -> None:
    """A PD TE's DistFlow agent: named after the TE (peers and logs say which TE), and reachable where the
    TE is — on loopback for a TE on loopback, else on every interface, advertised under the TE's host."""
    if config.kv_agent_name is None:
        config.kv_agent_name = te_id
    host = address.rpartition("://")[2].rpartition(":")[0].strip("[]")
    if config.kv_agent_host == "127.0.0.1" and host not in ("127.0.0.1", "localhost", "::1", ""):
        config.kv_agent_host = "0.0.0.0"
        if config.kv_agent_advertise is None:
            config.kv_agent_advertise = host if host not in ("*", "0.0.0.0") else socket.gethostname()


class TEShell:
    def __init__(
        self,
        te_id: str,
        incarnation: int,
        model: str,
        config: EngineConfig,
        cm_address: str,
        address: str,
    ) -> None:
        from deepflow.engine.core import EngineCore

        self.te_id = te_id
        self.stopping = False
        self._context = zmq.Context()
        self._cm = self._context.socket(zmq.DEALER)
        self._cm.setsockopt(zmq.IDENTITY, f"{te_id}.{incarnation}".encode())
        self._cm.setsockopt(zmq.LINGER, 0)
        self._cm.connect(cm_address)
        config.kv_events = True  # the JEs' prompt trees mirror this TE's cache
        if config.kv_transfer:
            _kv_agent_defaults(config, te_id, address)
        self.core = EngineCore(config)
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted JE takes its identity back
        # Never drop a JE's outputs silently: no send limit (JEs read continuously), and a peer that is
        # gone raises (EHOSTUNREACH) instead of swallowing the message.
        self._router.setsockopt(zmq.SNDHWM, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(address)
        self.info = m.TEInfo(
            te_id=te_id,
            incarnation=incarnation,
            model=model,
            pid=os.getpid(),
            host=socket.gethostname(),
            address=address,
            max_model_len=self.core.max_model_len,
            eos_token_ids=list(self.core.eos_token_ids),
            model_path=str(self.core.model_path),
            block_size=config.block_size,
            num_kv_blocks=self.core.cache.num_blocks,
        )
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._cm, zmq.POLLIN)
        self._peers: dict[bytes, int] = {}  # JE identity -> its incarnation
        self._owner: dict[str, bytes] = {}  # live request id -> the JE that sent it
        self._last_heartbeat = 0.0

    # ---- the loop --------------------------------------------------------------------------------------
    def serve(self) -> int:
        """Run until stopped; 0 on a clean stop, 1 when the engine failed (the CM restarts the TE)."""
        self._heartbeat(force=True)
        logger.info("TE %s ready (pid %d, %s)", self.te_id, os.getpid(), self.info.address)
        try:
            run_core_loop(self.core, self._next_command, self._emit)
        except Exception:
            error = traceback.format_exc()
            logger.error("TE %s engine failed:\n%s", self.te_id, error)
            failed = m.encoder.encode(m.EngineCoreFailed(error=error))
            for peer in list(self._peers):  # a failed send forgets the peer
                self._send(peer, failed)
            self.close(linger_ms=1000)  # let the JEs have the reason before the process goes
            return 1
        self.close()
        return 0

    def _next_command(self, block: bool) -> Command | None:
        while True:
            if self.stopping:
                return Shutdown()
            self._heartbeat()
            ready = dict(self._poller.poll(200 if block else 0))
            if self._cm in ready:
                if isinstance(m.from_cm.decode(self._cm.recv()), m.StopTE):
                    logger.info("TE %s stopping at the cluster manager's request", self.te_id)
                    self.stopping = True
                continue
            if self._router in ready:
                peer, payload = self._router.recv_multipart()
                command = m.je_to_te.decode(payload)
                if isinstance(command, m.Hello):
                    self._hello(peer, command)
                    continue
                if isinstance(command, AddRequest):
                    self._owner[command.request.request_id] = peer
                    self._peers.setdefault(peer, 0)
                return command
            if not block:
                return None

    def _hello(self, peer: bytes, hello: m.Hello) -> None:
        previous = self._peers.get(peer)
        self._peers[peer] = hello.incarnation
        if previous is not None and previous != hello.incarnation:
            self._abort_requests_of(peer, "was restarted")
        # The new JE's load view and prompt tree start now: today's stats and everything cached so far.
        # (Events not yet taken are published with the next step; replaying one twice is harmless.)
        state = EngineCoreOutputs(
            outputs=[], stats=self.core.scheduler.stats(), kv_events=self.core.cache.residency_snapshot()
        )
        self._send(peer, m.encoder.encode(state))

    def _emit(self, batch: EngineCoreOutputs) -> None:
        per_peer: dict[bytes, list[EngineCoreOutput]] = {peer: [] for peer in self._peers}
        for out in batch.outputs:
            peer = (
                self._owner.pop(out.request_id, None)
                if out.finish_reason is not None
                else self._owner.get(out.request_id)
            )
            if peer is not None:
                per_peer.setdefault(peer, []).append(out)
        for peer, outputs in per_peer.items():
            self._send(peer, m.encoder.encode(msgspec.structs.replace(batch, outputs=outputs)))
        self._heartbeat()

    def _send(self, peer: bytes, payload: bytes) -> None:
        try:
            self._router.send_multipart([peer, payload], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the JE is gone (a restarted one says Hello again and starts afresh)
            self._peers.pop(peer, None)
            self._abort_requests_of(peer, f"is unreachable ({exc})")

    def _abort_requests_of(self, peer: bytes, why: str) -> None:
        """A JE that is gone (or restarted, not knowing what its predecessor sent): nobody would read its
        requests' outputs, so they stop here."""
        orphans = [rid for rid, owner in self._owner.items() if owner == peer]
        for rid in orphans:
            del self._owner[rid]
        if orphans:
            logger.warning("TE %s aborts %d requests: JE %r %s", self.te_id, len(orphans), peer, why)
            self.core.abort(orphans)

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_heartbeat >= HEARTBEAT_SECONDS:
            self._last_heartbeat = now
            beat = m.TEHeartbeat(info=self.info, stats=self.core.scheduler.stats())
            with contextlib.suppress(zmq.Again):  # no CM right now (restarting): the next beat will do
                self._cm.send(m.encoder.encode(beat), flags=zmq.NOBLOCK)

    def stop(self) -> None:
        self.stopping = True

    def close(self, linger_ms: int = 0) -> None:
        self.core.shutdown()
        self._context.destroy(linger=linger_ms)
