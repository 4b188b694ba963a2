"""EngineCore: the plain loop that ties the scheduler to the model runner, one step at a time.

With `async_scheduling` the runner executes step N on a worker thread while this thread plans step N+1
and then processes step N's output (paper §4.2, the overlap loop of SGLang/mini-sglang). PyTorch releases
the GIL inside its kernels, so the planning cost hides behind execution. Output is identical either way.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from deepflow.cache.block_pool import BlockPool
from deepflow.engine.config import EngineConfig
from deepflow.engine.model_runner import ModelRunner
from deepflow.engine.request import EngineCoreOutput, EngineCoreRequest, ModelRunnerOutput
from deepflow.engine.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model_path = config.model_path()
        self.runner = ModelRunner(
            self.model_path,
            config.torch_dtype(),
            config.block_size,
            config.num_kv_blocks,
            config.kv_cache_memory,
        )
        args = self.runner.model.args
        pool_tokens = self.runner.num_blocks * config.block_size
        max_model_len = min(
            config.max_model_len or args.max_position_embeddings, args.max_position_embeddings
        )
        if max_model_len > pool_tokens:
            logger.warning("max_model_len %d capped to the KV pool's %d tokens", max_model_len, pool_tokens)
            max_model_len = pool_tokens
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.block_pool,
        )
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="model-runner") if config.async_scheduling else None
        )
        self._inflight: Future[ModelRunnerOutput] | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.runner.model.args.eos_token_ids

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        return self.scheduler.abort(request_ids)

    def has_work(self) -> bool:
        return (
            self.scheduler.has_unfinished_requests()
            or self.scheduler.has_executor_updates()
            or self._inflight is not None
        )

    def step(self) -> list[EngineCoreOutput]:
        if self._executor is None:
            return self.scheduler.update_from_output(self.runner.execute(self.scheduler.schedule()))
        # Plan and launch step N+1 before collecting step N.
        scheduled = self.scheduler.schedule()
        # An empty step still runs when the executor has requests to forget, so its state never lingers.
        needs_run = (
            not scheduled.is_empty or scheduled.finished_request_ids or scheduled.preempted_request_ids
        )
        launched = self._executor.submit(self.runner.execute, scheduled) if needs_run else None
        outputs: list[EngineCoreOutput] = []
        if self._inflight is not None:
            outputs = self.scheduler.update_from_output(self._inflight.result())
        self._inflight = launched
        return outputs

    def shutdown(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
