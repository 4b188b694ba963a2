"""Engine-side request state and the typed messages between scheduler, model runner and engine core.

Pure logic: no torch, no sockets. Messages are msgspec structs so that they can cross a process boundary
unchanged (engine core ↔ front end, master ↔ executors).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import msgspec

from deepflow.cache.events import KVEvent
from deepflow.cache.rtc import BlockTransfer
from deepflow.engine.contexts import CreateContext
from deepflow.engine.kv_transfer import KVSink, KVTransfer
from deepflow.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV dropped; recomputed on resume
    # A prefill TE's request (KVProduce) after its first token: off the running list, its blocks held until
    # the decode TE has every byte (or the lease ends); never scheduled again.
    SENDING_KV = "sending_kv"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    """A tokenized request as it enters the engine core."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    arrival_time: float = 0.0
    priority: int = 0  # lower runs first; ties are first-come first-served
    cache_salt: str = ""  # prefix-cache namespace: requests of different salts never share cached KV
    context_id: str | None = None  # the prompt starts with this pinned context's tokens
    create_context: CreateContext | None = None  # compute the prompt's KV and pin it as a context
    # Its outputs reach the client only when it ends (not streamed): if its TE fails, it may start over
    # on another even after producing tokens.
    restartable: bool = False
    # Prefill/decode disaggregation (engine/kv_transfer.py): this TE consumes the prompt's KV from a prefill
    # TE (KVConsume) or prefills and produces it for a decode TE (KVProduce); None: colocated.
    kv_transfer: KVTransfer | None = None


class Request:
    """The scheduler's view of one sequence. Token ids may include `num_pending_tokens` not yet known:
    with asynchronous scheduling a step is planned before the previous step's sampled tokens arrive."""

    def __init__(
        self, core_request: EngineCoreRequest, max_model_len: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        params = core_request.sampling_params
        self.request_id = core_request.request_id
        self.prompt_token_ids = core_request.prompt_token_ids
        self.sampling_params = params
        self.eos_token_ids = frozenset(core_request.eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.arrival_time = core_request.arrival_time or clock()
        self.priority = core_request.priority
        self.cache_salt = core_request.cache_salt
        self.context_id = core_request.context_id
        self.create_context = core_request.create_context
        self.kv_transfer = core_request.kv_transfer
        self.context_pinned_tokens: int | None = None
        room = max_model_len - len(self.prompt_token_ids)
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.output_token_ids: list[int] = []
        self.num_pending_tokens = 0
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.first_scheduled_time: float | None = None
        self.status = RequestStatus.WAITING

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def sort_key(self) -> tuple[int, float]:
        return (self.priority, self.arrival_time)

    def check_stop(self) -> tuple[FinishReason | None, int | None]:
        """After a token was appended: (finish reason, stop token id) or (None, None) to go on."""
        last = self.output_token_ids[-1]
        n = len(self.output_token_ids)
        if n >= self.sampling_params.min_tokens:
            if last in self.eos_token_ids and not self.sampling_params.ignore_eos:
                return FinishReason.STOP, None
            if last in self.stop_token_ids:
                return FinishReason.STOP, last
        if n >= self.max_tokens:
            return FinishReason.LENGTH, None
        return None, None


class NewRequestData(msgspec.Struct, kw_only=True):
    """Everything an executor needs to (re)build a request's state: sent when it is admitted or resumed."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(msgspec.Struct, kw_only=True):
    """A diff for a request the executor already holds: just the blocks it gained this step."""

    request_id: str
    new_block_ids: list[int]


class KVProduceStart(msgspec.Struct, kw_only=True, frozen=True):
    """A prefill request's send order for the runner-side KV connector (engine/kv_connector/)."""

    request_id: str
    sink: KVSink
    mode: str  # KVMode
    tag: str  # DistFlow tag prefix of its transfers: the sink's id (a reservation, not a request id)
    timeout_s: float  # deadline of each of its transfers (its lease: no write outlives it)


class SchedulerOutput(msgspec.Struct, kw_only=True):
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Before this step the executor forgets finished/aborted requests entirely, and drops the KV state of
    # preempted ones while keeping their sampling state (a seeded generator must resume where it stopped).
    finished_request_ids: list[str]
    preempted_request_ids: list[str]
    # KV copies (evictions to the host tier, populates back, copy-on-write of a partial block) to perform in
    # order before this step's tokens are computed.
    kv_transfers: list[BlockTransfer] = msgspec.field(default_factory=list)
    # Prefill requests (KVProduce) the executor sees for the first time: where their prompt KV goes.
    kv_produce: list[KVProduceStart] = msgspec.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def has_executor_work(self) -> bool:
        """Tokens to compute, copies to make, or requests to forget: the executor must run this step."""
        return bool(
            self.total_num_scheduled_tokens
            or self.kv_transfers
            or self.finished_request_ids
            or self.preempted_request_ids
        )


class Logprobs(msgspec.Struct, array_like=True):
    """Log-probabilities of one generated token: its own, its rank, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class ModelRunnerOutput(msgspec.Struct, kw_only=True):
    """Tokens sampled in one step, for the requests whose scheduled tokens reached the end of the sequence."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[Logprobs | None]
    finished_transfer_ids: list[int] = msgspec.field(default_factory=list)  # populates now complete
    num_tokens: int = 0  # tokens computed in the step
    step_seconds: float = 0.0  # wall time of the step, copies included
    copied_blocks: int = 0  # KV blocks copied (tiers, copy-on-write) before computing
    copy_seconds: float = 0.0


class EngineCoreOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs | None] = msgspec.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    queue_time: float | None = None  # on a request's first output: seconds from arrival to first scheduled
    context_pinned_tokens: int | None = None  # a context-creating request's pinned tokens, when it finishes
    # A rejected request: "invalid" or "context_limit"; a disaggregated one (engine/kv_transfer.py) that
    # failed: "kv_timeout" (a decode TE waited past KVConsume.timeout_s) or "kv_transfer" (the transfer
    # failed, the peer aborted, or the prefill TE's lease ran out).
    error_type: str | None = None
    restarted: bool = False  # the sequence starts over on another TE: forget what it produced so far
    kv_sink: KVSink | None = None  # a decode TE's first output for a KVConsume request: where to push KV
    kv_transferred: bool = False  # a prefill TE's final output: the decode TE acknowledged every byte


class SchedulerStats(msgspec.Struct, kw_only=True):
    num_running: int
    num_waiting: int
    # Work still owed: prompt tokens not yet prefilled plus output tokens not yet generated (at most
    # max_tokens each); what a job executor's load-aware policy compares across TEs.
    outstanding_tokens: int = 0
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queries_total: int  # prompt tokens looked up
    prefix_cache_hits_total: int  # of those, tokens served from the cache (either tier)
    prefix_cache_host_hits_total: int = 0  # of the hits, tokens populated back from the host tier
    kv_blocks_evicted_total: int = 0  # blocks that left the device pool
    host_blocks_evicted_total: int = 0  # blocks dropped from the host tier
    populate_latencies: list[float] = msgspec.field(default_factory=list)  # since the last stats
    pinned_context_tokens: int = 0
    # Prefill/decode disaggregation: decode requests waiting for their KV, prefill requests waiting for the
    # decode side's acknowledgements, and finished requests whose blocks DistFlow may still touch.
    num_kv_waiting: int = 0
    num_kv_sending: int = 0
    num_kv_held: int = 0


class EngineCoreOutputs(msgspec.Struct, kw_only=True, tag="outputs"):
    """What one engine step sends to the front end: per-request outputs and the scheduler's gauges."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None = None
    kv_events: list[KVEvent] = msgspec.field(default_factory=list)  # cache-residency changes, when enabled
