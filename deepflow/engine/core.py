"""EngineCore: the plain loop that ties the scheduler to the model runner, one step at a time.

All torch work (loading, KV allocation, every step) happens on one dedicated model thread, whoever calls the
core: OpenMP keeps a thread team per calling thread, and two teams on a small machine oversubscribe the cores
(measured here: a decode step 2-3x slower once a second thread had run torch ops).

With `async_scheduling` the model thread executes step N while the calling thread plans step N+1 and then
processes step N's output (paper §4.2, the overlap loop of SGLang/mini-sglang). Scheduling is pure Python and
torch releases the GIL inside kernels, so planning hides behind execution. Output is identical either way.
The overlap has a price: step N+1 is planned before anything that arrives during step N, which then waits
for step N+2. With `async_max_step_tokens` set, steps larger than it (prefills, long) are collected before the
next is planned and only decode-sized steps overlap (opt-in: measured mixed, see EngineConfig).

The core caps oneDNN's per-shape primitive caches (`bound_onednn_caches`) before the model loads: left at
their defaults they were what grew a task executor's RSS under steady load.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from deepflow.cache.rtc import RelationalTensorCache
from deepflow.engine.config import EngineConfig
from deepflow.engine.kv_connector.scheduler import KVConnectorScheduler
from deepflow.engine.kv_transfer import KVPrefilled
from deepflow.engine.model_runner import KVTransferSetup, ModelRunner
from deepflow.engine.request import EngineCoreOutput, EngineCoreRequest, ModelRunnerOutput
from deepflow.engine.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)

# With KV transfers pending and nothing to compute, a step waits this long for DistFlow (or a command) instead
# of spinning: the loop still drains commands at least this often.
KV_IDLE_WAIT_S = 0.002

# The bf16 linears (PackedLinear: oneDNN's inner product on a pre-reordered weight) get one oneDNN
# primitive per input shape, and a step's row count is its token count: nearly every step with a prefill
# chunk is a new shape. Each primitive sits in two LRU caches, oneDNN's own and ideep's (torch's wrapper),
# 1,024 entries each by default, and keeps about 0.5 MiB whatever its size (measured: 0.55 MiB for a 64x128
# weight as for a 576x1728 one). So an engine's live heap grew by up to ~0.5 GiB as shapes accumulated, then
# fragmented as the caches churned (SmolLM2-135M, soak-like traffic: +430 MiB in the first 60 s; a TE +5.5%
# RSS over 16 minutes after warm-up). At 64 entries it is flat after the first seconds (+0.2% RSS over 140 s)
# and the extra misses (about 1.8 a step, ~0.65 ms each to build) cost about 1% of a step: decode shapes
# recur every step and stay cached, a prefill chunk's shape rarely recurs anyway. Both variables are read
# when the process makes its first primitive, so this runs before the model loads (its weight reorders are
# primitives too); values the environment already sets are kept.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's and ideep's primitive caches for this process, unless the environment already sets them.
    No effect once this process has made a oneDNN primitive (the caches are sized then)."""
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))


class EngineCore:
    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: the scheduler's (queue times, context TTLs, KV transfer deadlines); tests inject one."""
        bound_onednn_caches()
        self.config = config
        self.model_path = config.model_path()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model-runner")
        self.runner = self._model_thread.submit(
            ModelRunner,
            self.model_path,
            config.torch_dtype(),
            config.block_size,
            config.num_kv_blocks,
            config.kv_cache_memory,
            config.num_threads,
            config.host_cache_memory,
            config.num_host_blocks,
            config.device,
            config.backend,
            config.cpu_ids if config.pin_threads else [],
            self._kv_setup(config),
        ).result()
        args = self.runner.model.args
        pool_tokens = self.runner.num_blocks * config.block_size
        max_model_len = min(
            config.max_model_len or args.max_position_embeddings, args.max_position_embeddings
        )
        if args.sliding_window and max_model_len > args.sliding_window:
            logger.warning("max_model_len %d capped to sliding window %d", max_model_len, args.sliding_window)
            max_model_len = args.sliding_window
        if max_model_len > pool_tokens:
            logger.warning("max_model_len %d capped to the KV pool's %d tokens", max_model_len, pool_tokens)
            max_model_len = pool_tokens
        self.max_model_len = max_model_len
        # Pinned contexts never take the room one max-length request needs, or it could never run.
        context_room = pool_tokens - max_model_len
        max_context_tokens = min(
            config.max_context_tokens if config.max_context_tokens is not None else pool_tokens // 2,
            context_room,
        )
        self.cache = RelationalTensorCache(
            self.runner.num_blocks,
            config.block_size,
            self.runner.num_host_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            max_context_tokens=max_context_tokens,
            kv_events=config.kv_events,
        )
        self.kv_worker = self.runner.kv_worker
        kv_connector = (
            KVConnectorScheduler(self.kv_worker.identity, config.block_size, config.kv_quarantine_s)
            if self.kv_worker is not None
            else None
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.cache,
            clock,
            kv_connector,
        )
        self._inflight: Future[ModelRunnerOutput] | None = None
        self._inflight_long = False  # the step in flight has more than async_max_step_tokens tokens
        self._idle = False  # the last step had nothing to run
        self._shut = False

    @staticmethod
    def _kv_setup(config: EngineConfig) -> KVTransferSetup | None:
        if not config.kv_transfer:
            return None
        name = config.kv_agent_name or f"engine-{os.getpid()}-{secrets.token_hex(3)}"
        return KVTransferSetup(
            name, config.kv_agent_host, config.kv_agent_port, config.kv_agent_advertise, config.kv_backend
        )

    @property
    def kv_sink_address(self) -> str | None:
        """This engine's DistFlow agent (None without kv_transfer)."""
        return self.kv_worker.identity.agent_address if self.kv_worker is not None else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.runner.model.args.eos_token_ids

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self.scheduler.abort(request_ids)

    def kv_prefilled(self, command: KVPrefilled) -> list[EngineCoreOutput]:
        return self.scheduler.kv_prefilled(command)

    def release_context(self, context_id: str) -> bool:
        return self.scheduler.release_context(context_id)

    def reset_prefix_cache(self) -> int:
        return self.scheduler.reset_prefix_cache()

    def has_work(self) -> bool:
        return (
            self.scheduler.has_unfinished_requests()
            or self.scheduler.has_executor_updates()
            or self._inflight is not None
            or self.scheduler.has_kv_work()
        )

    def _kv_sync(self) -> None:
        """Between the two halves of the KV connector, on this thread: what the runner side saw goes to the
        scheduler side; the sinks the scheduler opened or closed go to the runner side (before the sink
        reaches anyone, so the first byte for it is counted)."""
        worker = self.kv_worker
        if worker is None:
            return
        self.scheduler.update_kv_connector_output(worker.poll())
        kv = self.scheduler.kv
        assert kv is not None
        worker.expect(kv.take_new_sinks())
        worker.drop(kv.take_dropped_sinks())

    def step(self) -> list[EngineCoreOutput]:
        self._kv_sync()
        outputs = self._step()
        self._kv_sync()
        kv_outputs = self.scheduler.take_kv_outputs()
        if self.kv_worker is not None and self._idle and not outputs and not kv_outputs:
            self.kv_worker.wait(KV_IDLE_WAIT_S)  # only transfers to wait for: no spinning
        # After the step's own outputs: a prefill request acknowledged while its first token was in flight
        # ends here, after that token (an output after its request's final one would be dropped).
        return outputs + kv_outputs if kv_outputs else outputs

    def _step(self) -> list[EngineCoreOutput]:
        self._idle = False
        if self._inflight is not None and self._inflight_long:
            # A long step in flight: collect it and plan nothing yet, so the caller admits what arrived
            # while it ran and the next plan (made after it) includes those requests.
            outputs = self.scheduler.update_from_output(self._inflight.result())
            self._inflight = None
            return outputs
        scheduled = self.scheduler.schedule()
        if self.kv_worker is not None:  # the sinks just reserved, before the step (a peer may write at once)
            kv = self.scheduler.kv
            assert kv is not None
            self.kv_worker.expect(kv.take_new_sinks())
        self._idle = not scheduled.has_executor_work and self._inflight is None
        if not self.config.async_scheduling:
            return self.scheduler.update_from_output(
                self._model_thread.submit(self.runner.execute, scheduled).result()
            )
        # Launch step N+1, then collect step N. An empty step still runs when the executor has requests to
        # forget, so their state never lingers.
        launched = (
            self._model_thread.submit(self.runner.execute, scheduled) if scheduled.has_executor_work else None
        )
        outputs: list[EngineCoreOutput] = []
        if self._inflight is not None:
            outputs = self.scheduler.update_from_output(self._inflight.result())
        self._inflight = launched
        limit = self.config.async_max_step_tokens
        self._inflight_long = limit is not None and scheduled.total_num_scheduled_tokens > limit
        return outputs

    def shutdown(self) -> None:
        """Idempotent: a test (or a TE) that lost an engine may shut it down again."""
        if self._shut:
            return
        self._shut = True
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None
        self._model_thread.submit(self.runner.close).result()
        self._model_thread.shutdown(wait=True)
