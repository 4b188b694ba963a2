"""The scheduler side of the KV connector: per-request state of disaggregated requests, pure.

No torch, no sockets, no wall clock: the scheduler passes its own clock's readings. `Scheduler` owns one
(when the engine runs with `kv_transfer`) and asks it three questions, as vLLM's connector is asked:

- which waiting requests wait for remote KV (a decode request, `KVConsume`: it reserved its blocks and
  stays in the waiting queue — the populate-wait state — until every byte and the first token are here);
- how many prompt tokens are external (all but the decode TE's own whole-block prefix hit: `KVSink`);
- when a finished request's blocks may be freed (`on_finish`): a prefill request's once the runner side
  reports that DistFlow will not touch them again (done, failed, or released after it was forgotten); a
  decode request's that ended before all its KV arrived only once the prefill side can no longer write into
  them (its last write or its abort notice arrived) or a quarantine has passed, so that bytes of a dead
  request are never written into blocks another request reuses.

States are enums; every wait has a deadline on the injected clock (a decode's `KVConsume.timeout_s`, a
prefill's `KVProduce.lease_s` after its first token, a quarantine's `quarantine_s`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from deepflow.engine.kv_connector.base import KVConnectorOutput, KVIdentity, SendStatus
from deepflow.engine.kv_transfer import KVConsume, KVProduce, KVSink

DEFAULT_QUARANTINE_S = 60.0  # past any transfer deadline (30 s by default) and lease of the prefill side


class ProducerState(enum.Enum):
    QUEUED = "queued"  # waiting on this (prefill) TE; the runner has never seen it
    PREFILLING = "prefilling"  # the runner has it: chunks computed, by-layer writes may be in flight
    SENDING = "sending"  # first token sampled and streamed; waiting for the decode TE's acknowledgements


class ConsumerState(enum.Enum):
    UNRESERVED = "unreserved"  # waiting for blocks to reserve for the prompt
    WAITING = "waiting"  # blocks reserved, sink sent; waiting for every byte and the first token
    DECODING = "decoding"  # admitted on complete KV: an ordinary request from here on


class HoldKind(enum.Enum):
    IN_FLIGHT = "in_flight"  # a finished prefill request whose writes may still read its blocks
    QUARANTINE = "quarantine"  # a finished decode request whose prefill side may still write its blocks


@dataclass
class Producer:
    produce: KVProduce
    tag: str  # the sink id its transfers carry
    state: ProducerState = ProducerState.QUEUED
    lease_deadline: float | None = None  # set at the first token
    status: SendStatus | None = None  # the runner side's report, once it came
    error: str = ""


@dataclass
class Consumer:
    consume: KVConsume
    deadline: float  # past it (still not decoding) the request ends with "kv_timeout"
    state: ConsumerState = ConsumerState.UNRESERVED
    sink: KVSink | None = None
    received: bool = False  # every byte of the sink arrived
    peer_aborted: bool = False  # the prefill side said it gave up (no byte of it is still coming)
    first_token: int | None = None  # from KVPrefilled

    @property
    def ready(self) -> bool:
        return self.state is ConsumerState.WAITING and self.received and self.first_token is not None


@dataclass
class Hold:
    kind: HoldKind
    sink_id: str = ""
    deadline: float | None = None  # a quarantine's end


class KVConnectorScheduler:
    def __init__(self, identity: KVIdentity, block_size: int, quarantine_s: float = DEFAULT_QUARANTINE_S):
        self.identity = identity
        self.block_size = block_size
        self.quarantine_s = quarantine_s
        self.producers: dict[str, Producer] = {}
        self.consumers: dict[str, Consumer] = {}
        self.holds: dict[str, Hold] = {}  # request id -> why its (finished) blocks are still held
        self.sink_owner: dict[str, str] = {}  # sink id -> request id, live consumers and quarantines
        self._new_sinks: list[str] = []  # for the runner side: receipts to collect
        self._dropped_sinks: list[str] = []  # for the runner side: receipts to forget
        self._next_sink = 0

    # ---- requests in ---------------------------------------------------------------------------------
    def add_consumer(self, request_id: str, consume: KVConsume, now: float) -> None:
        self.consumers[request_id] = Consumer(consume, deadline=now + consume.timeout_s)

    def add_producer(self, request_id: str, produce: KVProduce) -> None:
        self.producers[request_id] = Producer(produce, tag=produce.sink.sink_id or request_id)

    def make_sink(self, request_id: str, block_ids: list[int], num_local_tokens: int) -> KVSink:
        """A reservation's sink (its id unique in this incarnation), recorded for the runner side."""
        self._next_sink += 1
        sink_id = f"{self.identity.incarnation}.{self._next_sink}"
        sink = KVSink(
            te_id=self.identity.te_id,
            agent_address=self.identity.agent_address,
            incarnation=self.identity.incarnation,
            block_ids=list(block_ids),
            num_local_tokens=num_local_tokens,
            sink_id=sink_id,
        )
        consumer = self.consumers[request_id]
        consumer.sink = sink
        consumer.state = ConsumerState.WAITING
        self.sink_owner[sink_id] = request_id
        self._new_sinks.append(sink_id)
        return sink

    def is_held(self, request_id: str) -> bool:
        return request_id in self.holds

    def unpreemptable(self, request_id: str) -> bool:
        """A prefill request the runner has seen: its writes may read its blocks at any time until the
        runner says otherwise, so it is never preempted (its blocks would be reused under the copy)."""
        producer = self.producers.get(request_id)
        return producer is not None and producer.state is not ProducerState.QUEUED

    # ---- requests out --------------------------------------------------------------------------------
    def on_finish(self, request_id: str, now: float) -> bool:
        """The request leaves the scheduler (whatever the reason): forget its state; True when its blocks
        must stay held (then `holds` says until when)."""
        producer = self.producers.pop(request_id, None)
        if producer is not None:
            if producer.state is ProducerState.QUEUED or producer.status is not None:
                return False  # never seen by the runner, or the runner is done with its blocks
            self.holds[request_id] = Hold(HoldKind.IN_FLIGHT)
            return True
        consumer = self.consumers.pop(request_id, None)
        if consumer is None or consumer.sink is None:
            return False  # colocated, or nothing reserved: nobody writes into its blocks
        sink_id = consumer.sink.sink_id
        if consumer.received or consumer.peer_aborted:
            self._drop_sink(sink_id)
            return False
        self.holds[request_id] = Hold(HoldKind.QUARANTINE, sink_id, now + self.quarantine_s)
        return True

    def release(self, request_id: str) -> None:
        """A hold ended: the scheduler frees the blocks."""
        hold = self.holds.pop(request_id)
        if hold.sink_id:
            self._drop_sink(hold.sink_id)

    def _drop_sink(self, sink_id: str) -> None:
        self.sink_owner.pop(sink_id, None)
        self._dropped_sinks.append(sink_id)

    def expired_holds(self, now: float) -> list[str]:
        return [rid for rid, h in self.holds.items() if h.deadline is not None and h.deadline <= now]

    # ---- the runner side's reports -------------------------------------------------------------------
    def sink_request(self, sink_id: str) -> str | None:
        return self.sink_owner.get(sink_id)

    def take_new_sinks(self) -> list[str]:
        sinks, self._new_sinks = self._new_sinks, []
        return sinks

    def take_dropped_sinks(self) -> list[str]:
        sinks, self._dropped_sinks = self._dropped_sinks, []
        return sinks

    def has_work(self) -> bool:
        return bool(self.holds)

    def empty(self) -> bool:
        """No state left at all (what tests check once every request is gone)."""
        return not (
            self.producers
            or self.consumers
            or self.holds
            or self.sink_owner
            or self._new_sinks
            or self._dropped_sinks
        )

    @staticmethod
    def nothing(out: KVConnectorOutput | None) -> bool:
        return out is None or out.empty
