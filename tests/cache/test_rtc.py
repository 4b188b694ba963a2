"""The Relational Tensor Cache on its own: pure accounting, so each case runs in microseconds."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.cache.cost_model import PopulateCostModel
from deepflow.cache.rtc import RelationalTensorCache
from deepflow.engine.contexts import ContextLimitError

BS = 4


def cache(device: int = 16, host: int = 0, **options) -> RelationalTensorCache:
    return RelationalTensorCache(device, BS, host, **options)


def compute(rtc: RelationalTensorCache, rid: str, tokens: list[int], namespace: str = "") -> list[int]:
    """What the scheduler does for a new request: match all but the last token, allocate, commit."""
    match = rtc.match_by_prefix_tokens(namespace, tokens[:-1])
    table = rtc.alloc_blocks(rid, namespace, match, len(tokens))
    assert table is not None
    rtc.commit(rid, tokens, len(tokens))
    rtc.take_transfers()  # the pass ends; the step computes the blocks
    return table


def test_full_block_hit_shares_the_blocks() -> None:
    rtc = cache()
    prompt = list(range(1, 11))  # 2 whole blocks + 2 tokens
    first = compute(rtc, "a", prompt)
    match = rtc.match_by_prefix_tokens("", prompt[:-1])
    assert match.num_device_tokens == 8 and match.partial_src is None
    table = rtc.alloc_blocks("b", "", match, len(prompt))
    assert table is not None and table[:2] == first[:2] and table[2] != first[2]
    assert rtc.num_cached_tokens("b") == 8
    rtc.check_consistency()
    rtc.free("a")
    rtc.free("b")
    rtc.check_consistency()
    assert rtc.usage() == 0.0


def test_a_hit_ending_mid_block_copies_that_block() -> None:
    rtc = cache()
    first = compute(rtc, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    prompt = [1, 2, 3, 4, 5, 6, 70, 80]  # shares 6 tokens: one whole block and half of the next
    match = rtc.match_by_prefix_tokens("", prompt[:-1])
    assert match.num_device_tokens == 6 and match.partial_src == first[1]
    table = rtc.alloc_blocks("b", "", match, len(prompt))
    assert table is not None and table[0] == first[0] and table[1] not in first
    transfers = rtc.take_transfers()
    assert [(t.kind, t.src, t.dst) for t in transfers] == [("d2d", [first[1]], [table[1]])]
    rtc.check_consistency()


def test_a_partial_hit_is_given_up_when_its_source_is_the_block_missing() -> None:
    """The copy source is locked while the request's blocks are allocated; when evicting it is the only way
    to supply them, the request starts without the partial hit instead of failing (and failing again on
    every step: found as a livelock)."""
    rtc = cache(device=4)
    first = compute(rtc, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    rtc.free("a")
    prompt = [1, 2, 3, 4, 5, 6, *range(70, 80)]  # one whole block, half of the next; 4 blocks in all
    match = rtc.match_by_prefix_tokens("", prompt[:-1])
    assert match.num_device_tokens == 6 and match.partial_src == first[1]
    table = rtc.alloc_blocks("b", "", match, len(prompt))
    assert table is not None and table[0] == first[0] and len(table) == 4
    assert rtc.num_cached_tokens("b") == 4  # the whole block only
    assert all(t.kind != "d2d" for t in rtc.take_transfers())
    rtc.check_consistency()


def test_a_block_computed_in_this_pass_is_shared_but_never_copied_from() -> None:
    rtc = cache()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    match = rtc.match_by_prefix_tokens("", prompt[:-1])
    rtc.alloc_blocks("a", "", match, len(prompt))
    rtc.commit("a", prompt, len(prompt))  # same pass: its K/V is written by the coming step
    match = rtc.match_by_prefix_tokens("", [1, 2, 3, 4, 5, 6, 70])
    assert match.num_device_tokens == 4 and match.partial_src is None


def test_namespaces_never_share_entries() -> None:
    rtc = cache()
    compute(rtc, "a", list(range(1, 11)), namespace="tenant-a")
    other = rtc.match_by_prefix_tokens("tenant-b", list(range(1, 10)))
    assert other.num_device_tokens == 0 and other.partial_src is None
    assert rtc.match_by_prefix_tokens("tenant-a", list(range(1, 10))).num_device_tokens == 8


def test_eviction_takes_least_recently_used_unlocked_leaves_and_splits_the_last() -> None:
    rtc = cache(device=8)
    compute(rtc, "old", list(range(100, 117)))  # 4 whole blocks committed + 1 private
    rtc.free("old")
    compute(rtc, "new", list(range(200, 209)))  # 2 whole blocks + 1 private
    rtc.free("new")
    assert rtc.num_free_blocks == 2
    rtc.match_by_prefix_tokens("", list(range(200, 208)))  # touch "new": "old" is now the LRU
    table = rtc.alloc_blocks("c", "", None, 12)  # 3 blocks: one more than free
    assert table is not None
    assert rtc.match_by_prefix_tokens("", list(range(100, 116))).num_device_tokens == 12  # tail block only
    assert rtc.match_by_prefix_tokens("", list(range(200, 208))).num_device_tokens == 8
    assert rtc.stats.device_evicted_blocks == 1
    rtc.check_consistency()


def test_locked_blocks_are_never_evicted() -> None:
    rtc = cache(device=4)
    compute(rtc, "a", list(range(1, 17)))  # holds all 4 blocks
    assert rtc.alloc_blocks("b", "", None, 4) is None
    assert rtc.owners() == ["a"]
    rtc.check_consistency()


def test_evicted_blocks_go_to_the_host_tier_and_populate_brings_them_back() -> None:
    rtc = cache(device=4, host=8)
    prompt = list(range(1, 14))  # 3 whole blocks + 1
    compute(rtc, "a", prompt)
    rtc.free("a")
    compute(rtc, "b", list(range(50, 66)))  # needs all 4 device blocks: "a"'s 3 go to the host
    rtc.free("b")
    assert rtc.stats.device_evicted_blocks == 3
    match = rtc.match_by_prefix_tokens("", prompt[:-1])
    assert match.num_device_tokens == 0 and match.num_host_tokens == 12
    assert rtc.populate("c", match)
    transfers = rtc.take_transfers()
    populate = [t for t in transfers if t.kind == "h2d"]
    assert len(populate) == 1 and populate[0].transfer_id and len(populate[0].src) == 3
    assert not rtc.query_populate("c")
    waiting = rtc.match_by_prefix_tokens("", prompt[:-1])
    assert waiting.pending == populate[0].transfer_id  # a second request waits for the same copy
    rtc.transfers_done([populate[0].transfer_id])
    assert rtc.query_populate("c")
    match = rtc.match_by_prefix_tokens("", prompt[:-1])
    assert match.num_device_tokens == 12
    assert rtc.alloc_blocks("c", "", match, len(prompt)) is not None
    assert rtc.num_cached_tokens("c") == 12 and rtc.stats.host_hit_tokens == 12
    assert len(rtc.stats.populate_latencies) == 1
    rtc.check_consistency()


def test_without_a_host_tier_evicted_blocks_are_dropped() -> None:
    rtc = cache(device=4)
    compute(rtc, "a", list(range(1, 14)))
    rtc.free("a")
    compute(rtc, "b", list(range(50, 66)))
    assert not [t for t in rtc.take_transfers() if t.kind == "d2h"]
    match = rtc.match_by_prefix_tokens("", list(range(1, 13)))
    assert match.num_device_tokens == 0 and not match.host
    rtc.check_consistency()


def test_a_full_host_tier_drops_its_least_recently_used_blocks() -> None:
    rtc = cache(device=4, host=4)
    for i, base in enumerate((100, 200, 300)):  # each evicts the previous prompt's 3 blocks to the host
        compute(rtc, f"r{i}", list(range(base, base + 13)))
        rtc.free(f"r{i}")
    assert rtc.stats.host_evicted_blocks >= 2
    assert rtc.match_by_prefix_tokens("", list(range(100, 112))).num_host_tokens < 12
    rtc.check_consistency()


def test_contexts_stay_pinned_until_released_or_expired() -> None:
    rtc = cache(device=8, max_context_tokens=16)
    prompt = list(range(1, 11))
    rtc.reserve_context("ctx", len(prompt))
    compute(rtc, "creator", prompt)
    assert rtc.pin_context("ctx", "creator", prompt, expires_at=100.0) == 8
    rtc.free("creator")
    assert rtc.usage() == 2 / 8  # its two whole blocks stay locked
    compute(rtc, "filler", list(range(50, 74)))  # needs every other block: cannot take the pinned ones
    rtc.free("filler")
    match = rtc.match_by_id("ctx", [*prompt, 99])
    assert match is not None and match.num_device_tokens == 8
    assert rtc.expire_contexts(now=99.0) == []
    assert rtc.expire_contexts(now=100.0) == ["ctx"]
    assert rtc.match_by_id("ctx", prompt) is None
    assert rtc.usage() == 0.0
    rtc.check_consistency()


def test_the_context_cap_is_enforced_at_reservation() -> None:
    rtc = cache(device=8, max_context_tokens=12)
    rtc.reserve_context("a", 9)  # 2 whole blocks: 8 tokens
    with pytest.raises(ContextLimitError, match="cap of 12"):
        rtc.reserve_context("b", 8)
    with pytest.raises(ValueError, match="already in use"):
        rtc.reserve_context("a", 4)
    rtc.release_context("a")  # released while its prefill ran: never pinned
    rtc.reserve_context("b", 8)


def test_a_context_released_during_its_prefill_is_not_pinned() -> None:
    rtc = cache(max_context_tokens=16)
    prompt = list(range(1, 11))
    rtc.reserve_context("ctx", len(prompt))
    compute(rtc, "creator", prompt)
    assert rtc.release_context("ctx") is False
    assert rtc.pin_context("ctx", "creator", prompt, expires_at=1e9) is None
    rtc.free("creator")
    assert rtc.usage() == 0.0 and rtc.contexts() == []


def test_reset_drops_everything_nobody_uses() -> None:
    rtc = cache(device=8, host=8)
    compute(rtc, "live", list(range(1, 10)))
    compute(rtc, "done", list(range(50, 59)))
    rtc.free("done")
    assert rtc.reset() == 2
    assert rtc.match_by_prefix_tokens("", list(range(50, 58))).num_device_tokens == 0
    assert rtc.match_by_prefix_tokens("", list(range(1, 9))).num_device_tokens == 8
    rtc.check_consistency()


def test_the_consistency_check_catches_a_leak() -> None:
    rtc = cache()
    compute(rtc, "a", list(range(1, 10)))
    rtc._holdings["a"].private.pop()  # a block nobody owns any more
    with pytest.raises(AssertionError, match="lost or shared"):
        rtc.check_consistency()


def test_the_cost_model_populates_only_when_copying_beats_recomputing() -> None:
    model = PopulateCostModel()
    for tokens in (16, 64, 256, 1024, 16, 512) * 5:
        model.observe_step(tokens, 0.01 + tokens * 5e-4)  # 0.5 ms per prefill token
    for blocks in (4, 64, 16, 2):
        model.observe_copy(blocks, blocks * 1e-5)
    assert model.recompute_seconds(1000) == pytest.approx(0.5, rel=0.01)
    # Waiting one (average) step dominates a populate: here steps average ~0.14 s.
    assert model.populate_seconds(64) == pytest.approx(model.step_seconds + 64e-5, rel=0.01)
    assert model.should_populate(num_tokens=1024, num_blocks=64)
    assert not model.should_populate(num_tokens=32, num_blocks=2)


def test_the_cost_model_recovers_when_the_engine_calms_down() -> None:
    """Every term keeps being observed, so slow steps or copies do not switch the host tier off for good."""
    model = PopulateCostModel()
    for _ in range(20):
        model.observe_step(1024, 1.5)  # an overloaded engine: populating means waiting 1.5 s
        model.observe_copy(64, 0.5)
    assert not model.should_populate(num_tokens=1024, num_blocks=64)
    for _ in range(200):
        model.observe_step(8, 0.02)  # quiet decode steps ...
        model.observe_step(512, 0.02 + 512 * 7e-4)  # ... and prefills at 0.7 ms per token
        model.observe_copy(64, 0.005)
    assert model.should_populate(num_tokens=1024, num_blocks=64)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(1, 30), st.booleans()), max_size=40
    ),
    host=st.sampled_from([0, 6]),
)
def test_residency_events_keep_a_job_executors_prompt_tree_in_step(ops, host) -> None:
    """Mirrored through its events, the cache's contents as a JE sees them equal what the cache matches."""
    from deepflow.platform.je.policies import GlobalPromptTree

    rtc = cache(device=10, host=host, kv_events=True)
    mirror = GlobalPromptTree(BS, verify_hashes=True)
    families = [[10 * f + i for i in range(40)] for f in range(3)]
    queries: list[tuple[str, list[int]]] = []
    for step, (family, salt, length, reset) in enumerate(ops):
        namespace = f"salt{salt % 2}"
        tokens = families[family][:length]
        match = rtc.match_by_prefix_tokens(namespace, tokens[:-1])
        if rtc.alloc_blocks(f"r{step}", namespace, match, len(tokens)) is not None:
            rtc.commit(f"r{step}", tokens, len(tokens))
            rtc.take_transfers()
            rtc.free(f"r{step}")
        if reset and step % 5 == 0:
            rtc.reset()
        queries.append((namespace, tokens))
        for event in rtc.take_events():
            mirror.apply(msgspec.structs.replace(event, te_id="te-0"))
        rtc.check_consistency()
        for query_ns, query in queries:
            found = rtc.match_by_prefix_tokens(query_ns, query)
            cached = sum(n for _, n in found.device) * BS + found.num_host_tokens
            assert mirror.match(query_ns, query).get("te-0", 0) == cached
        # A job executor joining now replays the snapshot and sees the same.
        joined = GlobalPromptTree(BS, verify_hashes=True)
        for event in rtc.residency_snapshot():
            joined.apply(msgspec.structs.replace(event, te_id="te-0"))
        for query_ns, query in queries:
            assert joined.match(query_ns, query) == mirror.match(query_ns, query)


def test_a_namespace_is_reclaimed_once_its_blocks_are_gone() -> None:
    """Every distinct cache_salt makes a root; one left empty (evicted, reset) must not stay forever."""
    rtc = cache(device=4)
    for i in range(3):  # each salt's blocks are evicted by the next one's
        compute(rtc, f"r{i}", list(range(1, 13)), namespace=f"salt-{i}")
        rtc.free(f"r{i}")
    assert set(rtc.tree.roots) <= {"salt-1", "salt-2"} and "salt-0" not in rtc.tree.roots
    compute(rtc, "held", [5, 6, 7, 8, 9], namespace="held")
    rtc.reset()
    assert set(rtc.tree.roots) == {"held"}  # a namespace in use stays
    rtc.free("held")
    rtc.reset()
    assert not rtc.tree.roots
    rtc.check_consistency()
