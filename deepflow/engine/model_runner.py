"""Executes scheduler decisions on the model: a stateful worker that receives diffs (vLLM v1 style).

The runner keeps each live request's token ids, block table and sampling state. A `SchedulerOutput` only
says which requests arrived, which blocks they gained and how many tokens each computes this step; the
token ids themselves come from the runner's own state, which is what lets the scheduler plan step N+1
before step N's sampled ids are known.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deepflow.cache.rtc import BlockTransfer
from deepflow.engine.attention import AttentionMetadata
from deepflow.engine.kv_connector.worker import KVConnectorWorker
from deepflow.engine.models.llama import LlamaModel, load_model
from deepflow.engine.request import Logprobs, ModelRunnerOutput, NewRequestData, SchedulerOutput
from deepflow.engine.sampler import RequestSamplingState, Sampler, make_state

_CASCADE_MIN_SAVED_BLOCKS = 32


@dataclass
class CachedRequestState:
    token_ids: list[int]  # prompt + output
    block_ids: list[int]
    num_computed_tokens: int
    sampling: RequestSamplingState


def kv_bytes_per_block(model: LlamaModel, block_size: int) -> int:
    args = model.args
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * element


def _common_prefix(tables: list[list[int]]) -> int:
    """How many leading block ids all tables share: the same physical blocks, a prefix cached once. The last
    block of each table is excluded, as it holds the token being decoded (always a request's own block)."""
    first = tables[0]
    limit = min(len(t) for t in tables) - 1
    count = 0
    while count < limit and all(t[count] == first[count] for t in tables):
        count += 1
    return count


@dataclass(frozen=True)
class KVTransferSetup:
    """What the runner needs to join prefill/decode disaggregation (from `EngineConfig`)."""

    agent_name: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None
    backend: str = "auto"  # flow.Backend's value


def kv_layout(model: LlamaModel, model_path: Path, dtype: torch.dtype, block_size: int):  # type: ignore[no-untyped-def]
    """The DistFlow compatibility descriptor of this engine's KV pool: two TEs exchange KV only when the
    model (its config.json, hashed), dtype and KV geometry agree."""
    import hashlib

    from deepflow.flow import LayoutDescriptor

    args = model.args
    digest = hashlib.sha256((Path(model_path) / "config.json").read_bytes()).hexdigest()[:16]
    return LayoutDescriptor(
        model_id=Path(model_path).name,
        dtype=str(dtype).removeprefix("torch."),
        num_layers=args.num_layers,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        block_size=block_size,
        extra={"config": digest},
    )


class ModelRunner:
    def __init__(
        self,
        model_path: str | Path,
        dtype: torch.dtype,
        block_size: int,
        num_blocks: int | None,
        kv_cache_memory: int,
        num_threads: int | None = None,
        host_cache_memory: int = 0,
        num_host_blocks: int | None = None,
        device: str = "cpu",
        backend: str = "auto",
        cpu_ids: list[int] | None = None,
        kv_transfer: KVTransferSetup | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.pinned_cpus = self._pin_threads(cpu_ids) if self.device.type == "cpu" else []
        self.model = load_model(model_path, dtype, self.device, backend)
        self.block_size = block_size
        self.num_blocks = num_blocks or max(kv_cache_memory // kv_bytes_per_block(self.model, block_size), 1)
        args = self.model.args
        shape = (args.num_kv_heads, self.num_blocks, block_size, args.head_dim)
        self.kv_worker: KVConnectorWorker | None = None
        self._kv_pool = None
        if kv_transfer is not None:
            # In named shared memory, so that a peer on this host copies straight into (or out of) it.
            from deepflow.flow import KVPoolLayout, allocate_kv_pool

            if self.device.type != "cpu":
                raise ValueError("kv_transfer needs the KV pool in CPU memory (device 'cpu')")
            pool = KVPoolLayout(
                layout=kv_layout(self.model, Path(model_path), dtype, block_size), num_blocks=self.num_blocks
            )
            self._kv_pool = allocate_kv_pool(pool)
            self.kv_caches = self._kv_pool.kv_caches
            self.kv_worker = KVConnectorWorker(
                kv_transfer.agent_name,
                pool.layout,
                pool,
                self._kv_pool.segment,
                host=kv_transfer.host,
                port=kv_transfer.port,
                advertise=kv_transfer.advertise,
                backend=kv_transfer.backend,
            )
        else:
            self.kv_caches = [
                (
                    torch.zeros(shape, dtype=dtype, device=self.device),
                    torch.zeros(shape, dtype=dtype, device=self.device),
                )
                for _ in range(args.num_layers)
            ]
        # The host tier of the Relational Tensor Cache: same layout, its own budget. On CPU both tiers are
        # RAM but distinct, with real copies; on a GPU it is pinned host memory. `zeros` touches
        # every page now (~0.2 s a GiB): the budget is taken at start, so a machine short of memory fails
        # here rather than under load, and the TE's RSS is flat from its first request (a soak measures it).
        per_block = kv_bytes_per_block(self.model, block_size)
        self.num_host_blocks = (
            num_host_blocks if num_host_blocks is not None else host_cache_memory // per_block
        )
        host_shape = (args.num_kv_heads, self.num_host_blocks, block_size, args.head_dim)
        pin = self.device.type == "cuda"
        self.host_caches = [
            (
                torch.zeros(host_shape, dtype=dtype, pin_memory=pin),
                torch.zeros(host_shape, dtype=dtype, pin_memory=pin),
            )
            for _ in range(args.num_layers if self.num_host_blocks else 0)
        ]
        self.sampler = Sampler()
        self.cascade_min_saved_blocks = _CASCADE_MIN_SAVED_BLOCKS
        self.requests: dict[str, CachedRequestState] = {}
        self._parked: dict[str, RequestSamplingState] = {}  # preempted: KV gone, sampling state kept

    @staticmethod
    def _pin_threads(cpu_ids: list[int] | None) -> list[int]:
        """Pin this (the model) thread's OpenMP team one thread per CPU; [] leaves it unpinned. Runs on the
        model thread: OpenMP keeps a team per calling thread, and this is the one every step uses."""
        from deepflow.engine import kernels

        if cpu_ids == [] or not kernels.available("init_cpu_threads"):
            return []
        allowed = sorted(os.sched_getaffinity(0))
        ids = list(cpu_ids) if cpu_ids is not None else allowed[: torch.get_num_threads()]
        outside = sorted(set(ids) - set(allowed))
        if outside:
            raise ValueError(f"cpu_ids {outside} are not CPUs this process may run on ({allowed})")
        torch.ops.deepflow.init_cpu_threads(ids)
        return ids

    def close(self) -> None:
        """The KV connector's agent and shared pool (the segment is unlinked; views die with the runner)."""
        if self.kv_worker is not None:
            self.kv_worker.close()
            self.kv_worker = None
        if self._kv_pool is not None:
            self.kv_caches = []
            self._kv_pool.close()
            self._kv_pool = None

    # ---- state diffs -------------------------------------------------------------------------------
    def _apply(self, out: SchedulerOutput) -> None:
        for request_id in out.preempted_request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                self._parked[request_id] = state.sampling
        for request_id in out.finished_request_ids:
            self.requests.pop(request_id, None)
            self._parked.pop(request_id, None)
            if self.kv_worker is not None:
                self.kv_worker.forget(request_id)
        for new in out.new_requests:
            self.requests[new.request_id] = self._new_state(new)
        if self.kv_worker is not None:
            for start in out.kv_produce:
                self.kv_worker.start(start)
        for cached in out.cached_requests:
            self.requests[cached.request_id].block_ids.extend(cached.new_block_ids)

    def _new_state(self, new: NewRequestData) -> CachedRequestState:
        sampling = self._parked.pop(new.request_id, None)
        if sampling is None:
            sampling = make_state(new.sampling_params, new.prompt_token_ids, frozenset(new.eos_token_ids))
            sampling.output_token_ids.extend(new.output_token_ids)
        return CachedRequestState(
            token_ids=new.prompt_token_ids + new.output_token_ids,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            sampling=sampling,
        )

    # ---- one step ----------------------------------------------------------------------------------
    def _transfer(self, transfer: BlockTransfer) -> None:
        """Copy blocks between tiers in every layer (K and V), before anything this step reads them."""
        src_caches, dst_caches = {
            "d2h": (self.kv_caches, self.host_caches),
            "h2d": (self.host_caches, self.kv_caches),
            "d2d": (self.kv_caches, self.kv_caches),
        }[transfer.kind]
        for (src_k, src_v), (dst_k, dst_v) in zip(src_caches, dst_caches, strict=True):
            src = torch.tensor(transfer.src, dtype=torch.long, device=src_k.device)
            dst = torch.tensor(transfer.dst, dtype=torch.long, device=dst_k.device)
            dst_k.index_copy_(1, dst, src_k.index_select(1, src).to(dst_k.device))
            dst_v.index_copy_(1, dst, src_v.index_select(1, src).to(dst_v.device))

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        started = time.perf_counter()
        for transfer in out.kv_transfers:
            self._transfer(transfer)
        copied = time.perf_counter()
        output = self._execute(out)
        output.finished_transfer_ids = [t.transfer_id for t in out.kv_transfers if t.transfer_id]
        output.num_tokens = out.total_num_scheduled_tokens
        output.copied_blocks = sum(len(t.src) for t in out.kv_transfers)
        output.copy_seconds = copied - started
        output.step_seconds = time.perf_counter() - started
        return output

    def _execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._apply(out)
        if out.is_empty:
            return ModelRunnerOutput(request_ids=[], sampled_token_ids=[], logprobs=[])
        # Decodes (one token) first: they share one batched attention call; prefill chunks follow.
        order = sorted(out.num_scheduled_tokens.items(), key=lambda item: item[1] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_indices: list[int] = []
        sampling_ids: list[str] = []
        tables: list[list[int]] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        num_decodes = 0
        bs = self.block_size
        for request_id, num_new in order:
            state = self.requests[request_id]
            start = state.num_computed_tokens
            end = start + num_new
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = state.block_ids
            slot_mapping.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            tables.append(blocks)
            query_lens.append(num_new)
            seq_lens.append(end)
            num_decodes += num_new == 1
            if end == len(state.token_ids):
                logits_indices.append(len(input_ids) - 1)
                sampling_ids.append(request_id)
        cascade = 0
        if num_decodes > 1:
            shared = _common_prefix(tables[:num_decodes])
            # Cascade attention (the shared blocks once, then each sequence's own) when it saves enough
            # reading to pay for its extra pass (benchmarks/decode_shared_prefix.py: 85 -> 38 ms per step for
            # 8 sequences sharing 1,024 tokens through the torch backend).
            if shared * (num_decodes - 1) >= self.cascade_min_saved_blocks:
                cascade = shared
        device = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            num_decodes=num_decodes,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=tables,
            block_size=bs,
            cascade_blocks=cascade,
        )
        worker = self.kv_worker
        plan = worker.plan(out.num_scheduled_tokens, self.requests) if worker is not None else []
        after_layer = None
        if plan and worker is not None and worker.wants_layers(plan):

            def after_layer(layer: int) -> None:
                worker.after_layer(plan, layer)

        logits = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=device),
            self.kv_caches,
            meta,
            torch.tensor(logits_indices, dtype=torch.long, device=device),
            after_layer,
        )
        if plan and worker is not None:
            worker.after_forward(plan)  # by request: the prompt's KV is complete in every layer now
        for request_id, num_new in order:
            self.requests[request_id].num_computed_tokens += num_new
        if not sampling_ids:
            return ModelRunnerOutput(request_ids=[], sampled_token_ids=[], logprobs=[])
        states = [self.requests[r].sampling for r in sampling_ids]
        sampled = self.sampler(logits, states)
        for request_id, token_id in zip(sampling_ids, sampled.token_ids, strict=False):
            state = self.requests[request_id]
            state.token_ids.append(token_id)
            state.sampling.output_token_ids.append(token_id)
        logprobs = [
            None if lp is None else Logprobs(lp.token_id, lp.logprob, lp.rank, lp.top_ids, lp.top_logprobs)
            for lp in sampled.logprobs
        ]
        return ModelRunnerOutput(
            request_ids=sampling_ids, sampled_token_ids=sampled.token_ids, logprobs=logprobs
        )
