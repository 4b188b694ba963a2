"""Executes scheduler decisions on the model: a stateful worker that receives diffs (vLLM v1 style).

The runner keeps each live request's token ids, block table and sampling state. A `SchedulerOutput` only
says which requests arrived, which blocks they gained and how many tokens each computes this step; the
token ids themselves come from the runner's own state, which is what lets the scheduler plan step N+1
before step N's sampled ids are known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deepflow.cache.rtc import BlockTransfer
from deepflow.engine.models.llama import AttentionMetadata, LlamaModel, load_model
from deepflow.engine.request import Logprobs, ModelRunnerOutput, NewRequestData, SchedulerOutput
from deepflow.engine.sampler import RequestSamplingState, Sampler, make_state

_MASKED = float("-inf")
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
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = load_model(model_path, dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks or max(kv_cache_memory // kv_bytes_per_block(self.model, block_size), 1)
        args = self.model.args
        shape = (args.num_kv_heads, self.num_blocks, block_size, args.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(args.num_layers)
        ]
        # The host tier of the Relational Tensor Cache: same layout, its own budget. On CPU both tiers are
        # RAM but distinct, with real copies; on a GPU this would be pinned host memory. `zeros` touches
        # every page now (~0.2 s a GiB): the budget is taken at start, so a machine short of memory fails
        # here rather than under load, and the TE's RSS is flat from its first request (a soak measures it).
        per_block = kv_bytes_per_block(self.model, block_size)
        self.num_host_blocks = (
            num_host_blocks if num_host_blocks is not None else host_cache_memory // per_block
        )
        host_shape = (args.num_kv_heads, self.num_host_blocks, block_size, args.head_dim)
        self.host_caches = [
            (torch.zeros(host_shape, dtype=dtype), torch.zeros(host_shape, dtype=dtype))
            for _ in range(args.num_layers if self.num_host_blocks else 0)
        ]
        self.sampler = Sampler()
        # Decode attention gathers K/V blocks into one persistent buffer: a fresh tensor per layer costs
        # 3x more (measured: 0.8 vs 0.23 ms for 768 blocks), mostly in first-touch page faults.
        self._gather_buffer = torch.empty(0, dtype=dtype)
        self.cascade_min_saved_blocks = _CASCADE_MIN_SAVED_BLOCKS
        self.requests: dict[str, CachedRequestState] = {}
        self._parked: dict[str, RequestSamplingState] = {}  # preempted: KV gone, sampling state kept

    # ---- state diffs -------------------------------------------------------------------------------
    def _apply(self, out: SchedulerOutput) -> None:
        for request_id in out.preempted_request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                self._parked[request_id] = state.sampling
        for request_id in out.finished_request_ids:
            self.requests.pop(request_id, None)
            self._parked.pop(request_id, None)
        for new in out.new_requests:
            self.requests[new.request_id] = self._new_state(new)
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
        src = torch.tensor(transfer.src, dtype=torch.long)
        dst = torch.tensor(transfer.dst, dtype=torch.long)
        for (src_k, src_v), (dst_k, dst_v) in zip(src_caches, dst_caches, strict=True):
            dst_k.index_copy_(1, dst, src_k.index_select(1, src))
            dst_v.index_copy_(1, dst, src_v.index_select(1, src))

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
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefill_ranges: list[tuple[int, int]] = []
        prefill_ctx: list[tuple[list[int], int, int]] = []  # (block ids, start, end) of each chunk
        bs = self.block_size
        for request_id, num_new in order:
            state = self.requests[request_id]
            start = state.num_computed_tokens
            end = start + num_new
            first = len(input_ids)
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = state.block_ids
            slot_mapping.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            if num_new == 1:
                decode_tables.append(blocks)
                decode_lens.append(end)
            else:
                prefill_ranges.append((first, first + num_new))
                prefill_ctx.append((blocks, start, end))
            if end == len(state.token_ids):
                logits_indices.append(len(input_ids) - 1)
                sampling_ids.append(request_id)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
            num_decodes=len(decode_lens),
            decode_block_table=None,
            decode_mask=None,
            decode_gather_buffers=None,
            decode_shared_blocks=None,
            prefill_ranges=prefill_ranges,
            prefill_blocks=[],
            prefill_kv_lens=[],
            prefill_masks=[],
        )
        if decode_lens:
            shared = _common_prefix(decode_tables) if len(decode_tables) > 1 else 0
            # Cascade attention (the shared blocks once, then each sequence's own) when it saves enough
            # gathering to pay for its extra matmuls (benchmarks/decode_shared_prefix.py: 85 -> 38 ms per
            # step for 8 sequences sharing 1,024 tokens).
            if shared * (len(decode_tables) - 1) >= self.cascade_min_saved_blocks:
                meta.decode_shared_blocks = torch.tensor(decode_tables[0][:shared], dtype=torch.long)
                decode_tables = [t[shared:] for t in decode_tables]
                decode_lens = [n - shared * bs for n in decode_lens]
            meta.decode_block_table, meta.decode_mask = self._decode_tables(decode_tables, decode_lens)
            meta.decode_gather_buffers = self._gather_buffers(meta.decode_block_table.numel())
        for blocks, start, end in prefill_ctx:
            meta.prefill_kv_lens.append(end)
            if start == 0:
                meta.prefill_blocks.append(None)
                meta.prefill_masks.append(None)
                continue
            meta.prefill_blocks.append(torch.tensor(blocks[: -(-end // bs)], dtype=torch.long))
            query_pos = torch.arange(start, end).unsqueeze(1)
            meta.prefill_masks.append(torch.arange(end).unsqueeze(0) <= query_pos)

        logits = self.model(
            torch.tensor(input_ids, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            self.kv_caches,
            meta,
            torch.tensor(logits_indices, dtype=torch.long),
        )
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

    def _gather_buffers(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache = self.kv_caches[0][0]
        kvh, _, bs, hd = k_cache.shape
        size = kvh * num_blocks * bs * hd
        if self._gather_buffer.numel() < 2 * size:
            self._gather_buffer = torch.empty(2 * size, dtype=k_cache.dtype)
        shape = (kvh, num_blocks, bs, hd)
        return self._gather_buffer[:size].view(shape), self._gather_buffer[size : 2 * size].view(shape)

    def _decode_tables(self, tables: list[list[int]], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded to a common width (with block 0, masked out) and the additive padding mask."""
        width = -(-max(lens) // self.block_size)
        padded = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], dtype=torch.long)
        span = width * self.block_size
        lengths = torch.tensor(lens, dtype=torch.long).unsqueeze(1)
        mask = torch.zeros(len(lens), span, dtype=torch.float32)
        mask.masked_fill_(torch.arange(span).unsqueeze(0) >= lengths, _MASKED)
        # [1, D, 1, L]: broadcast over KV heads and the query group.
        return padded, mask.view(1, len(lens), 1, span)
