"""The scheduler is pure logic: these tests drive it with a fake executor, in milliseconds."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.cache.block_pool import BlockPool
from deepflow.engine.request import EngineCoreRequest, ModelRunnerOutput, SchedulerOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import Scheduler, SchedulerConfig


class FakeRunner:
    """Mirrors the model runner's bookkeeping (state diffs, which requests sample) without a model."""

    def __init__(self, seed: int = 0, eos: int = 2) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.parked: set[str] = set()
        self.rng = random.Random(seed)
        self.eos = eos

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.preempted_request_ids:
            if self.tokens.pop(rid, None) is not None:
                self.parked.add(rid)
                del self.computed[rid], self.blocks[rid]
        for rid in out.finished_request_ids:
            self.tokens.pop(rid, None)
            self.computed.pop(rid, None)
            self.blocks.pop(rid, None)
            self.parked.discard(rid)
        for new in out.new_requests:
            self.parked.discard(new.request_id)
            self.tokens[new.request_id] = new.prompt_token_ids + new.output_token_ids
            self.computed[new.request_id] = new.num_computed_tokens
            self.blocks[new.request_id] = list(new.block_ids)
        for cached in out.cached_requests:
            self.blocks[cached.request_id].extend(cached.new_block_ids)
        ids, sampled = [], []
        for rid, n in out.num_scheduled_tokens.items():
            self.computed[rid] += n
            assert self.computed[rid] <= len(self.tokens[rid]), "scheduled tokens the executor does not know"
            assert len(self.blocks[rid]) * 4 >= self.computed[rid], "KV slots missing for scheduled tokens"
            if self.computed[rid] == len(self.tokens[rid]):
                token = self.eos if self.rng.random() < 0.05 else self.rng.randrange(3, 100)
                self.tokens[rid].append(token)
                ids.append(rid)
                sampled.append(token)
        return ModelRunnerOutput(request_ids=ids, sampled_token_ids=sampled, logprobs=[None] * len(ids))


def make(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=128),
        BlockPool(num_blocks, block_size=4),
    )


def request(rid: str, prompt_len: int, max_tokens: int = 8, priority: int = 0, **kw) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=rid,
        prompt_token_ids=list(range(3, 3 + prompt_len)),
        sampling_params=SamplingParams(max_tokens=max_tokens, **kw),
        eos_token_ids=[2],
        priority=priority,
    )


def assert_blocks_consistent(s: Scheduler) -> None:
    pool = s.block_pool
    owned = [b for rid in pool.owners() for b in pool.block_table(rid)]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert len(owned) + pool.num_free_blocks == pool.num_blocks
    assert set(pool.owners()) <= {r.request_id for r in s.running}, "a non-running request holds blocks"


def test_token_budget_mixes_decodes_and_chunked_prefill() -> None:
    s = make(budget=10)
    s.add_request(request("a", 4))
    s.add_request(request("b", 30))
    first = s.schedule()
    assert first.num_scheduled_tokens == {"a": 4, "b": 6}  # b's prefill is chunked by the budget
    runner = FakeRunner()
    s.update_from_output(runner.execute(first))
    second = s.schedule()
    assert second.num_scheduled_tokens == {"a": 1, "b": 9}  # a decodes while b's next chunk fills the rest
    assert second.total_num_scheduled_tokens == 10


def test_max_num_seqs_limits_admission() -> None:
    s = make(max_seqs=2, budget=100)
    for i in range(3):
        s.add_request(request(f"r{i}", 3))
    assert set(s.schedule().num_scheduled_tokens) == {"r0", "r1"}


def test_priority_orders_admission_and_preemption() -> None:
    s = make(num_blocks=6, budget=100, max_seqs=8)
    s.add_request(request("low", 8, priority=5, ignore_eos=True))
    s.add_request(request("high", 8, priority=0, ignore_eos=True))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["high", "low"]
    runner = FakeRunner()
    runner.eos = -1
    s.update_from_output(runner.execute(out))
    for _ in range(6):
        s.update_from_output(runner.execute(s.schedule()))
    assert s.num_preemptions_total >= 1
    assert s.requests["low"].num_preemptions >= 1 and s.requests["high"].num_preemptions == 0


def test_rejects_prompt_without_room_for_output() -> None:
    s = make()
    for bad in (request("x", 0), request("y", 128)):
        try:
            s.add_request(bad)
        except ValueError:
            continue
        raise AssertionError("accepted a prompt that cannot produce a token")


def test_max_tokens_is_exact_with_pending_tokens() -> None:
    s = make()
    s.add_request(request("a", 5, max_tokens=3, ignore_eos=True))
    runner = FakeRunner()
    runner.eos = -1
    produced = []
    inflight = runner.execute(s.schedule())
    while s.has_unfinished_requests():  # async: plan step N+1 before step N's output is processed
        nxt = runner.execute(s.schedule())
        produced += [o for out in s.update_from_output(inflight) for o in out.new_token_ids]
        inflight = nxt
    assert len(produced) == 3


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    async_mode=st.booleans(),
    num_blocks=st.integers(min_value=16, max_value=48),
    budget=st.integers(min_value=1, max_value=48),
)
def test_random_submits_and_aborts_leave_nothing_behind(data, async_mode, num_blocks, budget) -> None:
    s = make(num_blocks=num_blocks, budget=budget, max_seqs=6)
    runner = FakeRunner(seed=data.draw(st.integers(0, 1000)))
    next_id = 0
    inflight: ModelRunnerOutput | None = None
    for _ in range(data.draw(st.integers(5, 60))):
        action = data.draw(st.sampled_from(["submit", "abort", "step", "step"]))
        if action == "submit":
            s.add_request(
                request(
                    f"r{next_id}",
                    data.draw(st.integers(1, 40)),
                    data.draw(st.integers(1, 20)),
                    priority=data.draw(st.integers(0, 2)),
                )
            )
            next_id += 1
        elif action == "abort" and s.requests:
            s.abort([data.draw(st.sampled_from(sorted(s.requests)))])
        else:
            out = runner.execute(s.schedule())
            if async_mode:
                out, inflight = inflight, out
            if out is not None:
                s.update_from_output(out)
        assert_blocks_consistent(s)
    # Drain: every request finishes, then every block is free and no state is left anywhere.
    for _ in range(2000):
        if not s.has_unfinished_requests() and inflight is None:
            break
        out = runner.execute(s.schedule())
        if async_mode:
            out, inflight = inflight, (out if s.has_unfinished_requests() else None)
        if out is not None:
            s.update_from_output(out)
        assert_blocks_consistent(s)
    runner.execute(s.schedule())  # delivers the last forget lists to the executor
    assert not s.requests and not s.running and not s.waiting
    assert s.block_pool.num_free_blocks == s.block_pool.num_blocks
    assert not runner.tokens and not runner.parked
