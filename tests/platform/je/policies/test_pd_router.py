"""The PD-aware router (Algorithm 1): the mode from the heatmap and the predictor, then the TEs per group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.platform.je.policies import (
    BlockStored,
    Combined,
    GlobalPromptTree,
    GroupSnapshot,
    LeastLoad,
    NoHealthyTE,
    Reason,
    RoutingRequest,
    TELoad,
    make_policy,
)
from deepflow.platform.je.policies.heatmap import Heatmap
from deepflow.platform.je.policies.pd import PDAwareRouter
from deepflow.platform.je.policies.predictors import NoisyOracle
from deepflow.platform.je.policies.router import ModelGroups, ModeReason, Route, ServeMode
from deepflow.platform.je.policies.routers import ROUTERS, make_router

BS = 16
SYSTEM = list(range(1000, 1512))  # 512 tokens

# Disaggregated wins for long prompts with short answers (the paper's first observation), colocated else.
HEATMAP = Heatmap(
    prefill_lengths=(128, 512, 2048),
    ratios=(0.0625, 0.25, 1.0),
    by_rps={
        1.0: ((-0.2, -0.3, -0.2), (0.3, -0.1, -0.2), (0.9, 0.4, 0.01)),
        4.0: ((-0.1, -0.2, -0.3), (0.5, -0.1, -0.1), (1.3, 0.6, -0.02)),
    },
)


def te(te_id: str, load: int = 0, healthy: bool = True) -> TELoad:
    return TELoad(te_id, outstanding_tokens=load, healthy=healthy)


def grp(name: str, tes: list[TELoad], cached: dict[str, list[int]] | None = None) -> GroupSnapshot:
    tree = GlobalPromptTree(BS)
    for te_id, tokens in (cached or {}).items():
        tree.apply(BlockStored.of(te_id, "", tokens, BS))
    return GroupSnapshot(tes, tree, name=name)


def groups(
    co: list[TELoad] | None = None,
    p: list[TELoad] | None = None,
    d: list[TELoad] | None = None,
    cached: dict[str, list[int]] | None = None,
) -> ModelGroups:
    return ModelGroups(
        colocated=grp("co", co, cached) if co is not None else None,
        prefill=grp("p", p, cached) if p is not None else None,
        decode=grp("d", d, cached) if d is not None else None,
    )


def both(**loads: int) -> ModelGroups:
    load = {"c0": 0, "c1": 0, "p0": 0, "d0": 0, **loads}
    return groups(
        [te("c0", load["c0"]), te("c1", load["c1"])], [te("p0", load["p0"])], [te("d0", load["d0"])]
    )


def rq(prompt_len: int, output: int, rid: str = "r", base: int = 0) -> RoutingRequest:
    return RoutingRequest(
        rid, [base + i for i in range(prompt_len)], expected_output_tokens=4096, true_output_tokens=output
    )


def oracle_router(**kw: object) -> PDAwareRouter:
    return PDAwareRouter(policy=Combined(), heatmap=HEATMAP, predictor="oracle", **kw)  # type: ignore[arg-type]


def test_registered_and_built_by_make_router(tmp_path: Path) -> None:
    assert "pd_aware" in ROUTERS
    path = tmp_path / "h.json"
    HEATMAP.save(path)
    r = make_router(
        "pd_aware",
        make_policy("combined"),
        heatmap=str(path),
        predictor="noisy_oracle",
        predictor_params={"accuracy": 0.9, "seed": 1},
        decode_policy="least_load",
    )
    assert isinstance(r, PDAwareRouter) and r.name == "pd_aware"
    rep = r.report()
    assert rep["heatmap"]["rps"] == [1.0, 4.0] and rep["predictor"]["predictor"] == "noisy_oracle"
    assert rep["policies"] == {"colocated": "combined", "prefill": "combined", "decode": "least_load"}
    json.dumps(rep)  # JSON-able, for /v1/cluster
    # An inline heatmap dict and a {"name": ...} policy, as a cluster.yaml could give them.
    r2 = make_router(
        "pd_aware", make_policy("combined"), heatmap=HEATMAP.to_dict(), prefill_policy={"name": "locality"}
    )
    assert r2.report()["policies"]["prefill"] == "locality"
    with pytest.raises(ValueError):
        make_router("pd_aware", make_policy("combined"), default_mode="sometimes")
    with pytest.raises(ValueError, match="cannot read the PD heatmap"):
        make_router("pd_aware", make_policy("combined"), heatmap=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError):
        make_router("pd_aware", make_policy("combined"), heatmap=str(tmp_path / "bad.json"))


def test_heatmap_sign_picks_the_mode() -> None:
    r = oracle_router()
    long_short = r.route(rq(2048, 100), both())  # ratio ~1/20: disaggregated (+2.2)
    assert (long_short.mode, long_short.mode_reason) == (ServeMode.DISAGGREGATED, ModeReason.HEATMAP)
    assert long_short.heatmap_value == pytest.approx(2.2) and long_short.predicted_output_tokens == 100
    assert long_short.prefill is not None and long_short.decode is not None and long_short.colocated is None
    assert long_short.te_ids == ["p0", "d0"]
    short_long = r.route(rq(128, 128), both())  # ratio 1: colocated (-0.5)
    assert (short_long.mode, short_long.mode_reason) == (ServeMode.COLOCATED, ModeReason.HEATMAP)
    assert short_long.colocated is not None and short_long.prefill is None


def test_the_predictor_decides_the_cell() -> None:
    # A 512-token prompt: disaggregated for a 32-token answer (ratio 1/16), colocated for 128 (1/4).
    r = PDAwareRouter(
        policy=Combined(), heatmap=HEATMAP, predictor="learned", predictor_params={"min_samples": 1}
    )
    prompt = RoutingRequest("x", SYSTEM, expected_output_tokens=1024)
    r.observe(prompt, 32)
    assert (
        r.route(RoutingRequest("y", SYSTEM, expected_output_tokens=1024), both()).mode
        is ServeMode.DISAGGREGATED
    )
    for i in range(40):
        r.observe(RoutingRequest(f"z{i}", SYSTEM, expected_output_tokens=1024), 128)
    route = r.route(RoutingRequest("w", SYSTEM, expected_output_tokens=1024), both())
    assert route.mode is ServeMode.COLOCATED and route.predicted_output_tokens > 64


def test_uncertain_and_unmeasured_cells_go_to_the_less_loaded_side() -> None:
    r = oracle_router(margin=0.05)
    # (2048, ratio 1) sums to -0.01: within the margin.
    co_busy = r.route(rq(2048, 2048), both(c0=900, c1=800, p0=100, d0=300))
    assert (co_busy.mode, co_busy.mode_reason) == (ServeMode.DISAGGREGATED, ModeReason.HEATMAP_UNCERTAIN)
    pd_busy = r.route(
        rq(2048, 2048), both(c0=900, c1=800, p0=100, d0=3000)
    )  # the decode side is the bottleneck
    assert pd_busy.mode is ServeMode.COLOCATED
    tie = r.route(rq(2048, 2048), both())
    assert tie.mode is ServeMode.COLOCATED  # default_mode
    assert oracle_router(margin=0.05, default_mode="disaggregated").route(rq(2048, 2048), both()).mode is (
        ServeMode.DISAGGREGATED
    )
    none = PDAwareRouter(policy=Combined(), predictor="oracle").route(rq(2048, 10), both(c0=50, c1=50))
    assert (none.mode, none.mode_reason, none.heatmap_value) == (
        ServeMode.DISAGGREGATED,
        ModeReason.NO_HEATMAP,
        None,
    )
    unmeasured = Heatmap((128,), (1.0,), {1.0: [[None]]})
    r2 = PDAwareRouter(policy=Combined(), heatmap=unmeasured, predictor="oracle")
    assert r2.route(rq(128, 10), both(p0=5)).mode_reason is ModeReason.NO_HEATMAP


def test_load_guard_overrules_an_overloaded_choice() -> None:
    r = oracle_router()
    # The heatmap says disaggregated, but the pair has 10k tokens queued against 1k on a colocated TE.
    route = r.route(rq(2048, 100), both(c0=1000, c1=3000, p0=10_000, d0=500))
    assert (route.mode, route.mode_reason) == (ServeMode.COLOCATED, ModeReason.HEATMAP_LOAD)
    assert route.colocated is not None and route.colocated.te_id == "c0"
    # Within the factor, or by too few tokens: the heatmap stands.
    assert r.route(rq(2048, 100), both(c0=6000, c1=6000, p0=10_000)).mode is ServeMode.DISAGGREGATED
    assert r.route(rq(2048, 100), both(c0=100, c1=100, p0=3000)).mode is ServeMode.DISAGGREGATED
    # Switched off.
    off = oracle_router(overload_factor=None)
    assert off.route(rq(2048, 100), both(c0=0, c1=0, p0=10**6)).mode is ServeMode.DISAGGREGATED


def test_only_one_mode_healthy_falls_back_cleanly() -> None:
    r = oracle_router()
    only_co = groups([te("c0")], [te("p0", healthy=False)], [te("d0")])
    route = r.route(rq(2048, 100), only_co)  # the heatmap would say disaggregated
    assert (route.mode, route.mode_reason) == (ServeMode.COLOCATED, ModeReason.ONLY_COLOCATED)
    route = r.route(rq(128, 128), groups(None, [te("p0")], [te("d0")]))
    assert (route.mode, route.mode_reason) == (ServeMode.DISAGGREGATED, ModeReason.ONLY_DISAGGREGATED)
    route = r.route(rq(128, 128), groups([te("c0", healthy=False)], [te("p0")], [te("d0")]))
    assert route.mode_reason is ModeReason.ONLY_DISAGGREGATED
    with pytest.raises(NoHealthyTE):
        r.route(rq(128, 128), groups([te("c0", healthy=False)], [te("p0")], None))
    with pytest.raises(NoHealthyTE):
        r.route(rq(128, 128), ModelGroups())


def test_within_groups_locality_while_balanced_load_otherwise_and_decode_by_load() -> None:
    r = oracle_router()
    prompt = SYSTEM + list(range(9000, 9000 + 1536))  # 2048 tokens, 512 of them cached on p1 and d1
    req = RoutingRequest("r", prompt, expected_output_tokens=4096, true_output_tokens=100)
    g = groups(
        [te("c0"), te("c1")],
        [te("p0", 800), te("p1", 1500)],
        [te("d0", 800), te("d1", 1500)],
        cached={"p1": SYSTEM, "d1": SYSTEM},
    )
    route = r.route(req, g)
    assert route.mode is ServeMode.DISAGGREGATED
    # Prefill: balanced (700 <= 2048 apart), 512 >= 25% of 2048 → the holder of the prefix.
    assert route.prefill is not None and (route.prefill.te_id, route.prefill.reason) == (
        "p1",
        Reason.PREFIX_MATCH,
    )
    # Decode: by load, the cache notwithstanding.
    assert route.decode is not None and (route.decode.te_id, route.decode.reason) == ("d0", Reason.LEAST_LOAD)
    # The hot-spot guard is kept: p1 is balanced by the absolute threshold but carries 1.33x the mean.
    g_hot = groups([te("c0"), te("c1")], [te("p0", 1500), te("p1", 3000)], [te("d0")], cached={"p1": SYSTEM})
    route = r.route(req, g_hot)
    assert route.prefill is not None and (route.prefill.te_id, route.prefill.reason) == (
        "p0",
        Reason.HOT_SPOT,
    )
    # A skewed prefill group: load wins there.
    g2 = groups([te("c0"), te("c1")], [te("p0", 0), te("p1", 9000)], [te("d0")], cached={"p1": SYSTEM})
    route = r.route(req, g2)
    assert route.prefill is not None and (route.prefill.te_id, route.prefill.reason) == (
        "p0",
        Reason.IMBALANCED,
    )


def test_decode_ties_go_to_the_longer_match_then_the_smaller_cache() -> None:
    r = oracle_router()
    req = RoutingRequest("r", SYSTEM + list(range(9000, 10536)), true_output_tokens=100)
    g = groups([te("c0")], [te("p0")], [te("d0"), te("d1")], cached={"d1": SYSTEM})
    assert r.route(req, g).decode.te_id == "d1"  # type: ignore[union-attr]
    other = list(range(50_000, 50_512))
    g = groups([te("c0")], [te("p0")], [te("d0"), te("d1")], cached={"d0": other})
    assert r.route(req, g).decode.te_id == "d1"  # type: ignore[union-attr]


def test_report_counts_every_reason_and_scores_the_predictor() -> None:
    r = PDAwareRouter(policy=Combined(), heatmap=HEATMAP, predictor=NoisyOracle(accuracy=0.5, seed=0))
    for i in range(200):
        req = rq(2048 if i % 2 else 128, 100, rid=f"r{i}", base=10_000 * i)
        r.route(req, both())
        r.observe(req, 100)
    rep = r.report()
    assert sum(rep["modes"].values()) == 200 == sum(rep["mode_reasons"].values())
    assert set(rep["modes"]) == {"colocated", "disaggregated"}
    assert sum(rep["te_reasons"]["colocated"].values()) == rep["modes"]["colocated"]
    assert sum(rep["te_reasons"]["prefill"].values()) == rep["modes"]["disaggregated"]
    assert rep["predictor"]["scored"] == 200 and 0.35 < rep["predictor"]["accuracy"] < 0.65
    assert rep["outside_grid"] > 0  # the noisy answers that fell off the grid
    json.dumps(rep)


def test_deterministic() -> None:
    def run() -> list[Route]:
        r = PDAwareRouter(
            policy=Combined(), heatmap=HEATMAP, predictor="noisy_oracle", predictor_params={"seed": 4}
        )
        out = []
        for i in range(50):
            req = rq(64 * (1 + i % 40), 10 * (1 + i % 13), rid=f"r{i}", base=i * 5000)
            out.append(r.route(req, both(c0=i * 37 % 3000, p0=i * 91 % 5000, d0=i * 13 % 4000)))
            r.observe(req, 10 * (1 + i % 13))
        return out

    assert run() == run()


tes_st = st.lists(st.tuples(st.integers(0, 20_000), st.booleans()), min_size=0, max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    co=tes_st,
    p=tes_st,
    d=tes_st,
    prompt_len=st.integers(1, 5000),
    output=st.integers(0, 5000),
    predictor=st.sampled_from(["oracle", "noisy_oracle", "learned"]),
    margin=st.floats(0, 0.5),
)
def test_chosen_tes_are_healthy_and_of_the_right_role(
    co: list[tuple[int, bool]],
    p: list[tuple[int, bool]],
    d: list[tuple[int, bool]],
    prompt_len: int,
    output: int,
    predictor: str,
    margin: float,
) -> None:
    def mk(prefix: str, spec: list[tuple[int, bool]]) -> list[TELoad] | None:
        return [te(f"{prefix}{i}", load, ok) for i, (load, ok) in enumerate(spec)] if spec else None

    g = groups(mk("c", co), mk("p", p), mk("d", d))
    r = PDAwareRouter(policy=Combined(), heatmap=HEATMAP, predictor=predictor, margin=margin)
    req = rq(prompt_len, output)
    healthy = {t.te_id for grp_ in (g.colocated, g.prefill, g.decode) if grp_ for t in grp_.tes if t.healthy}
    if not g.has_colocated() and not g.has_disaggregated():
        with pytest.raises(NoHealthyTE):
            r.route(req, g)
        return
    route = r.route(req, g)
    assert set(route.te_ids) <= healthy
    if route.mode is ServeMode.COLOCATED:
        assert g.has_colocated() and route.colocated is not None and route.colocated.te_id.startswith("c")
        assert route.prefill is None and route.decode is None
    else:
        assert g.has_disaggregated() and route.colocated is None
        assert route.prefill is not None and route.prefill.te_id.startswith("p")
        assert route.decode is not None and route.decode.te_id.startswith("d")
    if not (g.has_colocated() and g.has_disaggregated()):
        assert route.mode_reason in (ModeReason.ONLY_COLOCATED, ModeReason.ONLY_DISAGGREGATED)
    else:
        assert route.mode_reason in (
            ModeReason.HEATMAP,
            ModeReason.HEATMAP_LOAD,
            ModeReason.HEATMAP_UNCERTAIN,
            ModeReason.NO_HEATMAP,
        )
    assert route.predicted_output_tokens is not None and route.predicted_output_tokens >= 1


def test_decode_policy_default_is_least_load() -> None:
    assert PDAwareRouter(policy=Combined()).report()["policies"]["decode"] == LeastLoad.name
