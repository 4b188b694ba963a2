"""The RTC's eviction index and resumed commits against the RTC as it was before them.

`tests/cache/reference_rtc.py` is a frozen copy of the RTC that rebuilt a heap of every evictable node on each
eviction and walked every commit from the root. Random operations — admissions with chunked prefills,
decodes, preemptions, populates from the host tier, landing copies, pinned contexts, resets — are applied to
both in lockstep; every answer (matches, block tables, transfers, events, stats, usage) must be equal, and
after each operation the index must equal a brute-force recomputation (`check_consistency` →
`_check_index`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.cache.rtc import RelationalTensorCache
from tests.cache.reference_rtc import RelationalTensorCache as ReferenceRTC

BS = 4
FAMILIES = 3  # shared prefixes (system prompts) the requests start with
FAMILY_LEN = 40


@dataclass
class _Req:
    tokens: list[int]
    namespace: str
    allocated: int = 0  # tokens the block table covers
    computed: int = 0
    admitted: bool = False
    decoded: int = 0
    contexts: list[str] = field(default_factory=list)


def _match_view(match) -> tuple:
    """A match in block ids (nodes differ between the two implementations, their blocks must not)."""
    if match is None:
        return (None,)
    return (
        [(list(n.device), used) for n, used in match.device],
        [(list(n.host), used) for n, used in match.host],
        match.partial_src,
        match.partial_tokens,
        match.pending is not None,
        match.num_device_tokens,
    )


def _tokens(rid: int, generation: int, family: int, shared: int, length: int) -> list[int]:
    base = [1000 * family + i for i in range(FAMILY_LEN)]
    own = [100_000 + 1000 * rid + 100 * generation + i for i in range(length)]
    return base[:shared] + own


class Lockstep:
    def __init__(self, device: int, host: int, kv_events: bool) -> None:
        options = {"max_context_tokens": 10_000, "kv_events": kv_events, "clock": lambda: 0.0}
        self.new = RelationalTensorCache(device, BS, host, **options)
        self.old = ReferenceRTC(device, BS, host, **options)
        self.reqs: dict[str, _Req] = {}
        self.generation: dict[int, int] = {}
        self.inflight: list[int] = []
        self.contexts = 0

    def both(self, method: str, *args):
        a = getattr(self.new, method)(*args)
        b = getattr(self.old, method)(*args)
        return a, b

    def same(self, method: str, *args):
        a, b = self.both(method, *args)
        assert a == b, f"{method}{args}: {a} != {b}"
        return a

    # ---- operations -------------------------------------------------------------------------------------
    def admit(self, slot: int, family: int, shared: int, length: int, chunk: int, populate: bool) -> None:
        rid = f"r{slot}"
        req = self.reqs.get(rid)
        if req is None:
            gen = self.generation[slot] = self.generation.get(slot, 0) + 1
            tokens = _tokens(slot, gen, family, min(shared, FAMILY_LEN), length)
            req = self.reqs[rid] = _Req(tokens, f"ns{family % 2}")
        if req.admitted:
            return
        if self.same("is_populating", rid) and not self.same("query_populate", rid):
            return  # its copy is still in flight
        m_new, m_old = (
            self.new.match_by_prefix_tokens(req.namespace, req.tokens[:-1]),
            self.old.match_by_prefix_tokens(req.namespace, req.tokens[:-1]),
        )
        assert _match_view(m_new) == _match_view(m_old)
        if m_new.pending is not None:
            return
        if m_new.host and populate and not self.same("is_populating", rid):
            a, b = self.new.populate(rid, m_new), self.old.populate(rid, m_old)
            assert a == b
            if a:
                return
            m_new, m_old = (
                self.new.match_by_prefix_tokens(req.namespace, req.tokens[:-1]),
                self.old.match_by_prefix_tokens(req.namespace, req.tokens[:-1]),
            )
            assert _match_view(m_new) == _match_view(m_old)
        cached = m_new.num_device_tokens
        if m_new.host:  # not populated: the host part is recomputed
            m_new.host, m_old.host = [], []
        want = min(len(req.tokens), cached + max(chunk, 1))
        a = self.new.alloc_blocks(rid, req.namespace, m_new, want)
        b = self.old.alloc_blocks(rid, req.namespace, m_old, want)
        assert a == b, f"alloc {rid}: {a} != {b}"
        if a is None:
            return
        req.admitted = True
        req.allocated = want
        req.computed = self.same("num_cached_tokens", rid)

    def step(self, slot: int, count: int) -> None:
        """Compute `count` more tokens (a prefill chunk or a decode), growing the table first."""
        rid = f"r{slot}"
        req = self.reqs.get(rid)
        if req is None or not req.admitted:
            return
        target = min(req.computed + max(count, 1), len(req.tokens))
        if target > req.allocated:
            grown = self.same("append_block", rid, target)
            if grown is None:
                self.preempt(slot)
                return
            req.allocated = max(req.allocated, len(self.new.block_table(rid)) * BS)
        req.computed = target
        self.same("commit", rid, list(req.tokens), req.computed)
        if req.computed == len(req.tokens):  # sample a token: the sequence grows by one
            req.decoded += 1
            req.tokens.append(500_000 + 1000 * slot + req.decoded)

    def preempt(self, slot: int) -> None:
        rid = f"r{slot}"
        self.same("free", rid)
        req = self.reqs.get(rid)
        if req is not None:
            req.admitted, req.allocated, req.computed = False, 0, 0

    def finish(self, slot: int) -> None:
        self.same("free", f"r{slot}")
        self.reqs.pop(f"r{slot}", None)

    def end_pass(self, land: bool) -> None:
        a, b = self.both("take_transfers")
        assert [tuple(asdict_t(t)) for t in a] == [tuple(asdict_t(t)) for t in b]
        self.inflight += [t.transfer_id for t in a if t.transfer_id]
        if land and self.inflight:
            self.same("transfers_done", list(self.inflight))
            self.inflight = []

    def pin(self, slot: int) -> None:
        rid = f"r{slot}"
        req = self.reqs.get(rid)
        if req is None or not req.admitted:
            return
        self.contexts += 1
        cid = f"c{self.contexts}"
        prompt = req.tokens[: req.computed]
        self.same("reserve_context", cid, len(prompt))
        self.same("pin_context", cid, rid, prompt, 1e9)
        req.contexts.append(cid)

    def release(self, slot: int) -> None:
        for req in self.reqs.values():
            if req.contexts:
                self.same("release_context", req.contexts.pop(0))
                return

    def check(self) -> None:
        self.new.check_consistency()  # includes the index against a brute-force recomputation
        self.old.check_consistency()
        assert self.new.usage() == self.old.usage()
        assert self.new.num_free_blocks == self.old.num_free_blocks
        assert self.new.host.free_ids() == self.old.host.free_ids()
        assert self.new.device.free_ids() == self.old.device.free_ids()
        for rid in self.reqs:
            assert self.new.block_table(rid) == self.old.block_table(rid)
            assert self.new.num_committed_blocks(rid) == self.old.num_committed_blocks(rid)
        assert asdict(self.new.stats) == asdict(self.old.stats)
        assert self.new.take_events() == self.old.take_events()


def asdict_t(transfer) -> tuple:
    return (transfer.kind, list(transfer.src), list(transfer.dst), transfer.transfer_id)


OPS = st.lists(
    st.tuples(
        st.integers(0, 8),  # operation
        st.integers(0, 5),  # request slot
        st.integers(0, 40),  # family / shared prefix / count
        st.integers(1, 24),  # own tokens / chunk
        st.booleans(),
    ),
    max_size=80,
)


def run_ops(ops, device: int, host: int, kv_events: bool) -> None:
    sim = Lockstep(device, host, kv_events)
    for kind, slot, a, b, flag in ops:
        if kind in (0, 1):
            sim.admit(slot, a % FAMILIES, a, b, b if flag else 64, populate=flag)
        elif kind in (2, 3, 4):
            sim.step(slot, 1 if kind == 4 else b)
        elif kind == 5:
            sim.finish(slot) if flag else sim.preempt(slot)
        elif kind == 6:
            sim.end_pass(land=flag)
        elif kind == 7:
            sim.pin(slot) if flag else sim.release(slot)
        elif kind == 8:
            if flag and a % 4 == 0:
                sim.same("reset")
            else:
                sim.end_pass(land=True)
        sim.check()
    for slot in range(6):
        sim.finish(slot)
    while sim.contexts and any(r.contexts for r in sim.reqs.values()):
        sim.release(0)
    sim.end_pass(land=True)
    sim.check()


@settings(max_examples=400, deadline=None)
@given(
    ops=OPS, device=st.sampled_from([6, 12, 24]), host=st.sampled_from([0, 8, 20]), kv_events=st.booleans()
)
def test_the_indexed_rtc_decides_as_the_reference(ops, device, host, kv_events) -> None:
    run_ops(ops, device, host, kv_events)


def test_a_long_random_run_of_many_conversations() -> None:
    """A longer deterministic run than hypothesis draws: many requests through a small pool."""
    import random

    rng = random.Random(7)
    ops = [
        (rng.randrange(9), rng.randrange(6), rng.randrange(41), rng.randrange(1, 25), rng.random() < 0.5)
        for _ in range(3000)
    ]
    run_ops(ops, device=24, host=20, kv_events=True)


def test_a_head_split_off_a_node_being_populated_is_readable_once_the_copy_lands() -> None:
    """A request that computed the same prefix privately commits part-way into a node whose populate is in
    flight: the split's head is being copied into too, and must be marked done with it."""
    sim = Lockstep(device=24, host=24, kv_events=True)
    sim.admit(0, family=0, shared=40, length=4, chunk=64, populate=False)  # 11 blocks
    sim.step(0, 64)
    sim.end_pass(land=True)
    sim.finish(0)
    for slot, family in ((1, 1), (2, 2)):  # push slot 0's blocks out to the host tier
        sim.admit(slot, family=family, shared=40, length=4, chunk=64, populate=False)
        sim.step(slot, 64)
        sim.end_pass(land=True)
        sim.finish(slot)
        sim.check()
    assert sim.new.match_by_prefix_tokens("ns0", _tokens(0, 1, 0, 40, 4)[:-1]).host
    sim.admit(3, family=0, shared=40, length=4, chunk=8, populate=False)  # computes the prefix itself
    sim.admit(4, family=0, shared=40, length=4, chunk=64, populate=True)  # populates it
    assert sim.new.is_populating("r4")
    sim.step(3, 16)  # commits 6 blocks: into the populating node
    sim.check()
    sim.end_pass(land=True)
    sim.check()
    sim.admit(4, family=0, shared=40, length=4, chunk=64, populate=True)
    sim.admit(5, family=0, shared=40, length=4, chunk=64, populate=True)
    assert sim.reqs["r5"].admitted and sim.reqs["r5"].computed >= 24
    sim.check()
