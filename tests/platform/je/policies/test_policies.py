"""Each policy's choice on crafted snapshots, and the combined policy's guards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepflow.platform.je.policies import (
    POLICIES,
    BlockStored,
    ClusterSnapshot,
    Combined,
    Decision,
    GlobalPromptTree,
    GroupSnapshot,
    LeastLoad,
    LocalityAware,
    NoHealthyTE,
    Reason,
    RoundRobin,
    RoutingRequest,
    TELoad,
    make_policy,
)

BS = 16
SYSTEM = list(range(1000, 1256))  # a 256-token shared prefix (16 blocks)


def te(te_id: str, load: int = 0, running: int = 0, healthy: bool = True) -> TELoad:
    return TELoad(te_id, num_running=running, outstanding_tokens=load, healthy=healthy)


def group(tes: list[TELoad], cached: dict[str, list[int]] | None = None, ns: str = "") -> GroupSnapshot:
    tree = GlobalPromptTree(BS)
    for te_id, tokens in (cached or {}).items():
        tree.apply(BlockStored.of(te_id, ns, tokens, BS))
    return GroupSnapshot(tes, tree, name="g")


def req(tokens: list[int], salt: str = "", rid: str = "r") -> RoutingRequest:
    return RoutingRequest(rid, tokens, cache_salt=salt)


def suffix(i: int, n: int = 32) -> list[int]:
    return [5000 + 100 * i + j for j in range(n)]


# ------------------------------------------------------------------------------------------ round robin


def test_round_robin_cycles_in_id_order_over_healthy_tes() -> None:
    rr = RoundRobin()
    g = group([te("b"), te("a"), te("c", healthy=False), te("d")])
    assert [rr.select(req(SYSTEM), g).te_id for _ in range(5)] == ["a", "b", "d", "a", "b"]
    # Membership changes keep the turn: after b comes the next id, whoever is there now.
    g2 = group([te("a"), te("c"), te("d")])
    assert [rr.select(req(SYSTEM), g2).te_id for _ in range(3)] == ["c", "d", "a"]


def test_round_robin_reports_the_chosen_tes_match() -> None:
    d = RoundRobin().select(req(SYSTEM), group([te("a"), te("b")], {"a": SYSTEM}))
    assert d == Decision("a", Reason.ROUND_ROBIN, 256)


# ------------------------------------------------------------------------------------------- least load


def test_least_load_orders_by_tokens_then_running_then_id() -> None:
    ll = LeastLoad()
    assert ll.select(req(SYSTEM), group([te("a", 300), te("b", 100), te("c", 200)])).te_id == "b"
    assert ll.select(req(SYSTEM), group([te("a", 100, 3), te("b", 100, 1), te("c", 100, 2)])).te_id == "b"
    assert ll.select(req(SYSTEM), group([te("b", 100, 1), te("a", 100, 1)])).te_id == "a"


def test_least_load_ignores_locality() -> None:
    d = LeastLoad().select(req(SYSTEM), group([te("a", 100), te("b", 50)], {"a": SYSTEM}))
    assert d == Decision("b", Reason.LEAST_LOAD, 0)


# ---------------------------------------------------------------------------------------------- locality


def test_locality_picks_the_longest_match_whatever_the_load() -> None:
    g = group([te("a", 90_000), te("b", 0), te("c", 0)], {"a": SYSTEM, "b": SYSTEM[:128]})
    assert LocalityAware().select(req(SYSTEM + suffix(0)), g) == Decision("a", Reason.PREFIX_MATCH, 256)


def test_locality_breaks_ties_by_load_and_falls_back_to_least_load() -> None:
    g = group([te("a", 500), te("b", 100), te("c", 0)], {"a": SYSTEM, "b": SYSTEM})
    assert LocalityAware().select(req(SYSTEM), g) == Decision("b", Reason.PREFIX_MATCH, 256)
    assert LocalityAware().select(req(suffix(1)), g) == Decision("c", Reason.LOW_MATCH, 0)


def test_locality_respects_the_cache_salt() -> None:
    g = group([te("a", 500), te("b", 0)], {"a": SYSTEM}, ns="tenant-1")
    assert LocalityAware().select(req(SYSTEM, salt="tenant-1"), g).te_id == "a"
    assert LocalityAware().select(req(SYSTEM), g).te_id == "b"


# ---------------------------------------------------------------------------------------------- combined


def test_combined_uses_locality_when_balanced() -> None:
    g = group([te("a", 1500), te("b", 1000), te("c", 900)], {"a": SYSTEM})
    assert Combined().select(req(SYSTEM + suffix(0)), g) == Decision("a", Reason.PREFIX_MATCH, 256)


def test_combined_uses_load_when_skewed() -> None:
    g = group([te("a", 9000), te("b", 1000), te("c", 4000)], {"a": SYSTEM})
    assert Combined().select(req(SYSTEM + suffix(0)), g) == Decision("b", Reason.IMBALANCED, 0)


def test_combined_balance_thresholds_abs_or_rel() -> None:
    c = Combined(balance_abs_threshold=100, balance_rel_threshold=1.5)
    assert c.is_balanced([te("a", 150), te("b", 60)])  # abs: 90 <= 100
    assert c.is_balanced([te("a", 15_000), te("b", 10_000)])  # rel: 1.5x
    assert not c.is_balanced([te("a", 15_001), te("b", 10_000)])
    assert not c.is_balanced([te("a", 101), te("b", 0)])
    assert c.is_balanced([te("a", 0), te("b", 0)])


def test_combined_load_path_prefers_the_longer_match_at_equal_load() -> None:
    g = group([te("a", 9000), te("b", 1000), te("c", 1000)], {"c": SYSTEM})
    assert Combined().select(req(SYSTEM), g) == Decision("c", Reason.IMBALANCED, 256)


def test_combined_ignores_a_small_match() -> None:
    g = group([te("a", 1500), te("b", 1000)], {"a": SYSTEM[:32]})
    prompt = SYSTEM[:32] + suffix(0, 300)  # 32 of 332 tokens cached: below min_match_ratio 0.25
    assert Combined().select(req(prompt), g) == Decision("b", Reason.LOW_MATCH, 0)
    assert Combined(min_match_ratio=0.05).select(req(prompt), g) == Decision("a", Reason.PREFIX_MATCH, 32)


def test_hot_spot_goes_to_a_second_holder_when_the_first_is_overloaded() -> None:
    # Balanced by the absolute threshold (3000 - 1200 <= 2048), yet a carries 1.6x the mean.
    tes = [te("a", 3000), te("b", 1800), te("c", 1200), te("d", 1500)]
    g = group(tes, {"a": SYSTEM, "b": SYSTEM[:192], "c": SYSTEM[:64]})
    # b holds 192 >= 0.5 * 256 tokens of the prefix; c's 64 is too little to count as a replica.
    assert Combined().select(req(SYSTEM + suffix(0)), g) == Decision("b", Reason.HOT_SPOT, 192)


def test_hot_spot_seeds_a_replica_on_the_least_loaded_te_when_no_other_holds_the_prefix() -> None:
    tes = [te("a", 3000), te("b", 1500), te("c", 1200), te("d", 1500)]
    g = group(tes, {"a": SYSTEM})
    assert Combined().select(req(SYSTEM + suffix(0)), g) == Decision("c", Reason.HOT_SPOT, 0)


def test_no_hot_spot_at_low_load_or_alone() -> None:
    # 600 > 1.25 x mean 150, but only 600 tokens above the least loaded: keep the cache hit.
    g = group([te("a", 600), te("b", 0), te("c", 0), te("d", 0)], {"a": SYSTEM})
    assert Combined().select(req(SYSTEM), g).reason is Reason.PREFIX_MATCH
    assert Combined().select(req(SYSTEM), group([te("a", 50_000)], {"a": SYSTEM})).te_id == "a"


def _simulate(policy: LocalityAware | Combined, n: int = 60) -> tuple[dict[str, int], set[Reason]]:
    """A popular prefix: each request adds its prompt to the chosen TE's load; each step every TE drains
    40 tokens; a TE caches the prefix once it served it. Returns requests per TE and the reasons given."""
    loads = dict.fromkeys("abcd", 0)
    loads.update(b=400, c=400, d=400)  # other traffic
    tree = GlobalPromptTree(BS)
    tree.apply(BlockStored.of("a", "", SYSTEM, BS))
    served = dict.fromkeys(loads, 0)
    reasons: set[Reason] = set()
    for i in range(n):
        g = GroupSnapshot([te(t, load) for t, load in loads.items()], tree)
        d = policy.select(req(SYSTEM + suffix(i), rid=str(i)), g)
        served[d.te_id] += 1
        reasons.add(d.reason)
        loads[d.te_id] += 288 - d.matched_tokens + 64  # uncached prompt + decode
        tree.apply(BlockStored.of(d.te_id, "", SYSTEM, BS))
        loads = {t: max(0, load - 40) for t, load in loads.items()}
    return served, reasons


def test_hot_spot_guard_spreads_a_popular_prefix_that_locality_keeps_on_one_te() -> None:
    assert _simulate(LocalityAware())[0]["a"] == 60
    served, reasons = _simulate(Combined())
    assert sum(1 for n in served.values() if n) >= 2
    assert max(served.values()) < 50
    # The guard spread it while the group still counted as balanced (Algorithm 1 alone would not yet have).
    assert reasons == {Reason.PREFIX_MATCH, Reason.HOT_SPOT}


# ------------------------------------------------------------------------------------- all the policies


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_unhealthy_tes_are_never_chosen(name: str) -> None:
    policy = make_policy(name)
    # The sick TE is idle and holds the whole prompt: every policy would like it.
    g = group([te("a", 0, healthy=False), te("b", 700), te("c", 800)], {"a": SYSTEM})
    assert {policy.select(req(SYSTEM + suffix(i)), g).te_id for i in range(6)} <= {"b", "c"}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_healthy_te_raises(name: str) -> None:
    g = group([te("a", healthy=False), te("b", healthy=False)], {"a": SYSTEM})
    with pytest.raises(NoHealthyTE, match="'g'") as info:
        make_policy(name).select(req(SYSTEM), g)
    assert info.value.group == "g"
    with pytest.raises(NoHealthyTE):
        make_policy(name).select(req(SYSTEM), GroupSnapshot([]))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_work_without_a_prompt_tree(name: str) -> None:
    d = make_policy(name).select(req(SYSTEM), GroupSnapshot([te("a", 10), te("b", 5)]))
    assert d.te_id in {"a", "b"} and d.matched_tokens == 0


def test_make_policy() -> None:
    assert set(POLICIES) == {"round_robin", "least_load", "locality", "combined"}
    c = make_policy("combined", balance_abs_threshold=10, hot_spot_factor=2.0)
    assert isinstance(c, Combined) and c.balance_abs_threshold == 10 and c.name == "combined"
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(TypeError):
        make_policy("least_load", foo=1)
    with pytest.raises(ValueError):
        make_policy("combined", hot_spot_factor=1.0)


def test_cluster_snapshot_holds_groups() -> None:
    g = group([te("a")])
    assert ClusterSnapshot({"colocated": g}).group("colocated") is g


def test_policies_import_no_torch_sockets_or_asyncio() -> None:
    code = (
        "import sys, deepflow.platform.je.policies; "
        "print(sorted(m for m in ('torch', 'zmq', 'asyncio', 'socket') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------- misses: the smallest cache


def _sequential_misses(policy: LocalityAware | Combined | LeastLoad, n: int = 8) -> list[str]:
    """Issue 12's scenario as a new user tries it: two idle TEs, sequential requests (each done before the
    next, so both TEs are idle again) with distinct long prefixes; each TE caches what it served."""
    tree = GlobalPromptTree(BS)
    chosen = []
    for i in range(n):
        prompt = [10_000 * (i + 1) + j for j in range(512)]  # 32 blocks, shared with nobody
        d = policy.select(req(prompt, rid=str(i)), GroupSnapshot([te("te-0"), te("te-1")], tree))
        chosen.append(d.te_id)
        tree.apply(BlockStored.of(d.te_id, "", prompt, BS))
    return chosen


@pytest.mark.parametrize("policy", [LocalityAware(), Combined(), LeastLoad()], ids=lambda p: p.name)
def test_sequential_misses_on_idle_tes_fill_both_caches(policy: LocalityAware | Combined | LeastLoad) -> None:
    # Before: all eight on te-0 (ties broken by TE id). Now the smaller cache takes each new prefix.
    assert _sequential_misses(policy) == ["te-0", "te-1"] * 4


def test_a_miss_goes_to_the_smallest_cache_before_the_least_load_while_balanced() -> None:
    other = [7000 + j for j in range(640)]  # 40 blocks on a
    g = group([te("a", 0), te("b", 1000), te("c", 1500)], {"a": other, "c": SYSTEM[:64]})
    # Balanced (1500 - 0 <= 2048): b caches nothing, so b takes the new prefix though a is idler.
    assert Combined().select(req(suffix(3, 300)), g) == Decision("b", Reason.LOW_MATCH, 0)
    assert LocalityAware().select(req(suffix(3, 300)), g) == Decision("b", Reason.LOW_MATCH, 0)
    # A match below min_match_ratio counts as a miss: c's 64 of 364 tokens do not attract it.
    assert Combined().select(req(SYSTEM[:64] + suffix(3, 300)), g) == Decision("b", Reason.LOW_MATCH, 0)
    # Equal footprints: load decides.
    g2 = group([te("a", 900), te("b", 1000)], {"a": other[:320], "b": other[320:]})
    assert Combined().select(req(suffix(3, 300)), g2) == Decision("a", Reason.LOW_MATCH, 0)


def test_skewed_load_still_wins_over_footprint() -> None:
    # Imbalanced: least load decides; footprint only breaks exact ties of load and match.
    big = [7000 + j for j in range(640)]
    g = group([te("a", 100), te("b", 9000)], {"a": big})
    assert Combined().select(req(suffix(3, 300)), g) == Decision("a", Reason.IMBALANCED, 0)
    assert LeastLoad().select(req(suffix(3, 300)), g).te_id == "a"
    g2 = group([te("a", 100), te("b", 100), te("c", 9000)], {"a": big})
    assert Combined().select(req(suffix(3, 300)), g2) == Decision("b", Reason.IMBALANCED, 0)
    assert LeastLoad().select(req(suffix(3, 300)), g2).te_id == "b"


def test_footprint_is_zero_without_a_tree_or_a_counting_index() -> None:
    class MatchOnly:
        def match(self, namespace: str, token_ids: list[int]) -> dict[str, int]:
            return {}

    assert GroupSnapshot([te("a")]).footprint("a") == 0
    assert GroupSnapshot([te("a")], MatchOnly()).footprint("a") == 0  # type: ignore[arg-type]
    assert group([te("a")], {"a": SYSTEM}).footprint("a") == 16
