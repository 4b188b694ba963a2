"""The scheduler is pure logic: these tests drive it with a fake executor, in milliseconds."""

from __future__ import annotations

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from deepflow.cache.cost_model import PopulateCostModel
from deepflow.cache.rtc import BlockTransfer, RelationalTensorCache
from deepflow.engine.contexts import CreateContext
from deepflow.engine.request import EngineCoreRequest, ModelRunnerOutput, SchedulerOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import Scheduler, SchedulerConfig


class FakeRunner:
    """Mirrors the model runner's bookkeeping (state diffs, which requests sample) without a model, and
    simulates KV content: the slot of position p holds a digest of the tokens up to p. It performs the RTC's
    copies as the real runner does, writes the step's K/V before any request "attends", and checks that every
    position a request attends to holds the right digest, so a prefix hit on a wrong or stale block fails."""

    def __init__(self, seed: int = 0, eos: int = 2, block_size: int = 4) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.parked: set[str] = set()
        self.rng = random.Random(seed)
        self.eos = eos
        self.block_size = block_size
        self.tiers: dict[str, dict[tuple[int, int], int]] = {"device": {}, "host": {}}

    def _copy(self, transfer: BlockTransfer) -> None:
        tiers = {"d2h": ("device", "host"), "h2d": ("host", "device"), "d2d": ("device", "device")}
        src_tier, dst_tier = tiers[transfer.kind]
        src, dst = self.tiers[src_tier], self.tiers[dst_tier]
        read = [[src.get((b, o)) for o in range(self.block_size)] for b in transfer.src]  # all reads first
        for block, values in zip(transfer.dst, read, strict=True):
            for offset, value in enumerate(values):
                dst[(block, offset)] = value

    @staticmethod
    def _digests(tokens: list[int]) -> list[int]:
        """digests[p] stands for the K/V of position p, which depends on every token up to p."""
        out, last = [], 0
        for token in tokens:
            last = hash((last, token))
            out.append(last)
        return out

    def _slot(self, rid: str, pos: int) -> tuple[int, int]:
        return self.blocks[rid][pos // self.block_size], pos % self.block_size

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for transfer in out.kv_transfers:
            self._copy(transfer)
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
        device = self.tiers["device"]
        for rid, n in out.num_scheduled_tokens.items():  # every layer writes the batch's K/V first
            start = self.computed[rid]
            assert start + n <= len(self.tokens[rid]), "scheduled tokens the executor does not know"
            assert len(self.blocks[rid]) * self.block_size >= start + n, "KV slots missing for scheduled ones"
            digests = self._digests(self.tokens[rid])
            for pos in range(start, start + n):
                device[self._slot(rid, pos)] = digests[pos]
        ids, sampled = [], []
        for rid, n in out.num_scheduled_tokens.items():  # ... then attends over everything before
            self.computed[rid] += n
            digests = self._digests(self.tokens[rid])
            for pos in range(self.computed[rid]):
                assert device.get(self._slot(rid, pos)) == digests[pos], f"{rid}: wrong KV at position {pos}"
            if self.computed[rid] == len(self.tokens[rid]):
                token = self.eos if self.rng.random() < 0.05 else self.rng.randrange(3, 100)
                self.tokens[rid].append(token)
                ids.append(rid)
                sampled.append(token)
        return ModelRunnerOutput(
            request_ids=ids,
            sampled_token_ids=sampled,
            logprobs=[None] * len(ids),
            finished_transfer_ids=[t.transfer_id for t in out.kv_transfers if t.transfer_id],
        )


class AlwaysPopulate(PopulateCostModel):
    """A decision, not a fake: forces the host-tier path so tests cover it whatever the timings."""

    def should_populate(self, num_tokens: int, num_blocks: int) -> bool:
        return True


def make(
    num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, num_host_blocks: int = 0, **cache_options
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=128),
        RelationalTensorCache(num_blocks, block_size=4, num_host_blocks=num_host_blocks, **cache_options),
    )


def request(
    rid: str, prompt_len: int, max_tokens: int = 8, priority: int = 0, prompt: list[int] | None = None, **kw
) -> EngineCoreRequest:
    base = 3 + sum(map(ord, rid)) % 50  # distinct ids start distinct prompts: no accidental prefix hits
    return EngineCoreRequest(
        request_id=rid,
        prompt_token_ids=prompt if prompt is not None else [base + i % 40 for i in range(prompt_len)],
        sampling_params=SamplingParams(max_tokens=max_tokens, **kw),
        eos_token_ids=[2],
        priority=priority,
    )


def assert_blocks_consistent(s: Scheduler) -> None:
    s.cache.check_consistency()
    owners = set(s.cache.owners())
    assert owners <= {r.request_id for r in s.running}, "a non-running request holds blocks"


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


def test_cached_tokens_are_reported_in_whole_blocks() -> None:
    """A hit ending mid-block is reused (copy-on-write) but reported in whole blocks, as vLLM does: a
    token-exact count would tell a client how much of its prompt another client sent."""
    s = make()
    runner = FakeRunner()
    runner.eos = -1
    s.add_request(request("a", 0, max_tokens=1, prompt=list(range(10, 19))))
    while s.has_unfinished_requests():
        s.update_from_output(runner.execute(s.schedule()))
    s.add_request(request("b", 0, max_tokens=1, prompt=[*range(10, 17), 90, 91]))  # shares 7 tokens
    (out,) = s.update_from_output(runner.execute(s.schedule()))
    assert s.cache.stats.partial_hits == 1  # the 3 tokens of the second block were still reused
    assert out.num_cached_tokens == 4
    assert s.cache.stats.device_hit_tokens == 4


FAMILIES = [[3 + (7 * i + f) % 90 for i in range(60)] for f in range(3)]  # shared prompt prefixes

# One drawn action of the property test, as plain data so a found case can be kept as an `@example`:
#   ("submit", family, shared, tail, max_tokens, priority, context)  context: None or an index into the
#                                                                    live contexts (modulo their number)
#   ("context", family, shared, tail, max_tokens, priority, ttl)    create a context from the prompt
#   ("release", k) / ("abort", k)                                   the k-th context / request (modulo);
#                                                                    a step when there is none
#   ("step",)
_prompt_parts = (
    st.integers(0, len(FAMILIES) - 1),
    st.integers(0, 40),
    st.lists(st.integers(3, 99), max_size=12),
    st.integers(1, 20),
    st.integers(0, 2),
)
_submit = st.tuples(st.just("submit"), *_prompt_parts, st.none() | st.integers(0, 50))
ACTION = st.one_of(
    _submit,
    _submit,
    st.tuples(st.just("context"), *_prompt_parts, st.sampled_from([1e-9, 1e6])),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
    st.just(("step",)),
    st.just(("step",)),
)

# Found by hypothesis on a fresh clone (c4833f1): the head of the queue could not get blocks while requests
# behind it held theirs for finished populates; nothing was running, so no step ever made progress.
LIVELOCK_FOUND = dict(
    async_mode=False, num_blocks=23, num_host_blocks=64, budget=22, always_populate=False, caching=True,
    seed=669,
    actions=[
        ('submit', 0, 31, [13, 98, 58, 95, 67], 5, 0, None),
        ('step',),
        ('context', 0, 2, [82, 29, 80, 31], 15, 2, 1e-09),
        ('submit', 0, 26, [86, 18, 58, 10, 82, 5, 72, 72, 9, 55], 10, 0, 0),
        ('abort', 2),
        ('submit', 2, 22, [69, 16], 20, 0, None),
        ('step',),
        ('release', 0),
        ('submit', 0, 31, [47, 78, 48, 66, 33, 6], 9, 0, 0),
        ('release', 0),
        ('step',),
        ('step',),
        ('release', 0),
        ('context', 0, 30, [23, 5], 7, 0, 1e-09),
        ('release', 0),
        ('submit', 0, 11, [58, 4, 79, 90, 83, 77, 77, 3, 55, 11, 94, 76], 16, 1, None),
        ('step',),
        ('step',),
        ('submit', 2, 40, [], 15, 1, None),
        ('submit', 0, 11, [64], 1, 0, 0),
        ('submit', 0, 2, [98, 3, 75, 62, 86, 53, 86, 76, 48, 46, 69, 33], 4, 0, None),
        ('release', 0),
        ('step',),
        ('submit', 0, 15, [87, 4, 88, 24, 19, 45, 92, 45], 4, 2, None),
        ('step',),
        ('submit', 1, 14, [20, 56, 74], 19, 1, None),
        ('step',),
    ],
)  # fmt: skip


# Found by the progress check: without prefix caching, a context's creator resumed after a preemption did
# not match the blocks it had committed, computed them again and locked both copies (twice its blocks).
CONTEXT_RESUME_FOUND = dict(
    async_mode=False, num_blocks=37, num_host_blocks=0, budget=9, always_populate=False, caching=False,
    seed=377,
    actions=[
        ('context', 2, 37, [3, 3, 3, 3, 3, 3, 3, 3], 7, 2, 1e-09),
        ('context', 0, 0, [3, 3, 3, 3], 17, 1, 1e-09),
        ('release', 0),
        ('submit', 0, 3, [3, 3], 1, 0, None),
        ('step',),
        ('release', 0),
        ('context', 1, 26, [3, 3, 3, 3, 3, 3], 1, 0, 1000000.0),
        ('step',),
        ('submit', 0, 0, [], 3, 1, None),
        ('release', 0),
        ('step',),
        ('step',),
        ('submit', 0, 0, [], 1, 2, None),
        ('step',),
        ('step',),
        ('release', 0),
        ('submit', 0, 0, [], 1, 0, None),
        ('submit', 0, 0, [], 1, 0, None),
        ('submit', 0, 2, [3, 3, 3, 3, 3, 3], 10, 1, None),
        ('step',),
        ('release', 0),
        ('submit', 0, 0, [], 1, 0, None),
        ('release', 0),
        ('step',),
        ('submit', 0, 0, [], 1, 0, None),
        ('submit', 0, 3, [], 3, 1, None),
        ('release', 0),
        ('step',),
        ('step',),
        ('release', 0),
        ('release', 0),
        ('release', 0),
        ('submit', 0, 0, [], 1, 0, None),
        ('submit', 0, 0, [], 1, 0, None),
        ('submit', 0, 0, [], 1, 0, None),
        ('context', 0, 28, [], 1, 0, 1000000.0),
    ],
)  # fmt: skip


# Found by the KV check: a request whose partial-block hit the RTC gave up (to evict its source) started
# from the match's token count, partial tokens included, and attended to a block nobody had written.
PARTIAL_GIVEN_UP_FOUND = dict(
    async_mode=False, num_blocks=23, num_host_blocks=8, budget=20, always_populate=False,
    caching=True, seed=36,
    actions=[
        ('step',),
        ('context', 0, 8, [], 2, 2, 1000000.0),
        ('submit', 0, 3, [], 2, 2, None),
        ('context', 0, 0, [], 1, 0, 1e-09),
        ('context', 0, 0, [], 1, 0, 1e-09),
        ('step',),
        ('release', 0),
        ('step',),
        ('abort', 2),
        ('release', 0),
        ('step',),
        ('release', 0),
        ('submit', 2, 31, [3, 4], 5, 1, None),
        ('context', 0, 0, [], 4, 2, 1000000.0),
        ('context', 2, 0, [], 1, 0, 1e-09),
        ('step',),
        ('release', 1),
        ('submit', 0, 0, [3], 2, 0, None),
        ('release', 0),
        ('release', 0),
        ('submit', 0, 34, [3, 4, 3, 6, 3, 3], 2, 2, None),
        ('context', 2, 0, [], 2, 2, 1e-09),
        ('step',),
        ('submit', 0, 0, [4, 3, 3, 3, 3], 2, 2, None),
        ('submit', 0, 0, [3, 3], 2, 0, None),
        ('step',),
        ('submit', 1, 2, [3, 3, 3, 3, 3, 3, 3, 7, 3, 7, 27], 1, 0, None),
    ],
)  # fmt: skip


def serial_steps(s: Scheduler) -> int:
    """Steps to finish every unfinished request one at a time, each from scratch: prefill chunks under the
    budget plus one step per output token (and one more for the token in flight when scheduling is async)."""
    budget = s.config.max_num_batched_tokens
    requests = s.requests.values()
    return sum(-(-r.num_tokens // budget) + r.max_tokens - r.num_output_tokens + 2 for r in requests)


@settings(max_examples=max(300, settings.default.max_examples), deadline=None)
@given(
    async_mode=st.booleans(),
    num_blocks=st.integers(min_value=20, max_value=48),
    num_host_blocks=st.sampled_from([0, 8, 64]),
    budget=st.integers(min_value=4, max_value=48),
    always_populate=st.booleans(),
    caching=st.booleans(),
    seed=st.integers(0, 1000),
    actions=st.integers(5, 60).flatmap(lambda n: st.lists(ACTION, min_size=n, max_size=n)),
)
@example(**LIVELOCK_FOUND)
@example(**CONTEXT_RESUME_FOUND)
@example(**PARTIAL_GIVEN_UP_FOUND)
def test_random_interleavings_keep_the_cache_consistent(
    async_mode, num_blocks, num_host_blocks, budget, always_populate, caching, seed, actions
) -> None:
    """Requests sharing prefixes, aborts, preemptions, evictions to the host tier, populates, contexts that
    are created, deleted or expire: every block is always in exactly one place, locks match their holders,
    every attended position holds the right K/V, and at the end only live contexts hold anything.

    Progress: after the last submit every request finishes within twice the steps it would take to run the
    remaining requests one at a time from scratch, whatever contexts, pins, populates and budget say."""
    s = make(
        num_blocks=num_blocks,
        budget=budget,
        max_seqs=6,
        num_host_blocks=num_host_blocks,
        enable_prefix_caching=caching,
        # As the engine does: pins leave room for the longest request (here 52 + 20 tokens, 18 blocks).
        max_context_tokens=(num_blocks - 18) * 4,
        cost_model=AlwaysPopulate() if always_populate else None,
    )
    runner = FakeRunner(seed=seed)
    inflight: ModelRunnerOutput | None = None
    contexts: list[str] = []
    next_id = 0
    for kind, *args in actions:
        if kind in ("submit", "context"):
            family, shared, tail, max_tokens, priority, extra = args
            prompt = FAMILIES[family][:shared] + tail or [3]
            core_request = request(f"r{next_id}", 0, max_tokens, priority=priority, prompt=prompt)
            if kind == "context":
                core_request.create_context = CreateContext(context_id=f"ctx{next_id}", ttl_seconds=extra)
            elif extra is not None and contexts:
                core_request.context_id = contexts[extra % len(contexts)]
            try:
                s.add_request(core_request)
            except ValueError:  # a context over the cap: rejected before it holds anything
                assert kind == "context"
            else:
                if kind == "context":
                    contexts.append(f"ctx{next_id}")
            next_id += 1
        elif kind == "release" and contexts:
            s.release_context(contexts[args[0] % len(contexts)])
        elif kind == "abort" and s.requests:
            live = sorted(s.requests)
            s.abort([live[args[0] % len(live)]])
        else:  # a step (also a release or abort with nothing to act on)
            out = runner.execute(s.schedule())
            if async_mode:
                out, inflight = inflight, out
            if out is not None:
                s.update_from_output(out)
        assert_blocks_consistent(s)
    # Drain: every request finishes in bounded steps, then every block is free or cached, and no state is
    # left anywhere.
    bound = 2 * serial_steps(s) + 4
    for _ in range(bound):
        if not s.has_unfinished_requests() and inflight is None:
            break
        out = runner.execute(s.schedule())
        if async_mode:
            out, inflight = inflight, (out if s.has_unfinished_requests() else None)
        if out is not None:
            s.update_from_output(out)
        assert_blocks_consistent(s)
    runner.execute(s.schedule())  # delivers the last forget lists to the executor
    stuck = [(r.request_id, r.status.value, r.num_computed_tokens, r.num_tokens) for r in s.requests.values()]
    assert not s.requests and not s.running and not s.waiting, f"not finished in {bound} steps: {stuck}"
    assert not s.cache.owners()
    assert not runner.tokens and not runner.parked
    for context_id in s.cache.contexts():
        s.release_context(context_id)
    assert s.cache.usage() == 0.0, "a block is still held with no request or context alive"
    s.cache.reset()
    s.cache.check_consistency()
    assert s.cache.num_free_blocks == s.cache.num_blocks
    assert not s.cache.tree.roots, "an empty cache namespace was kept"
