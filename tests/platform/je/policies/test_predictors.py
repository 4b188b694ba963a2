"""Decode-length predictors: the oracle, the noisy oracle's accuracy, the learned one, and their scoring."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.platform.je.policies.predictors import (
    PREDICTORS,
    AccuracyMeter,
    LearnedLength,
    MeasuredPredictor,
    NoisyOracle,
    OracleLength,
    is_accurate,
    make_predictor,
)
from deepflow.platform.je.policies.types import RoutingRequest

SYSTEM_A = list(range(1000, 1128))  # 128-token system prompts
SYSTEM_B = list(range(2000, 2128))


def rq(
    rid: str,
    prompt: list[int] | int = 100,
    *,
    budget: int | None = None,
    truth: int | None = None,
    salt: str = "",
    ignore_eos: bool = False,
) -> RoutingRequest:
    tokens = list(range(prompt)) if isinstance(prompt, int) else prompt
    return RoutingRequest(
        rid,
        tokens,
        cache_salt=salt,
        expected_output_tokens=budget,
        ignore_eos=ignore_eos,
        true_output_tokens=truth,
    )


def test_accuracy_is_within_a_factor_of_one_plus_tolerance() -> None:
    assert is_accurate(100, 100) and is_accurate(150, 100) and is_accurate(100, 150)
    assert not is_accurate(151, 100) and not is_accurate(66, 100)
    assert is_accurate(1, 0) and is_accurate(0, 1)  # lengths below 1 count as 1
    assert is_accurate(110, 100, tolerance=0.1) and not is_accurate(111, 100, tolerance=0.1)


def test_oracle_answers_the_truth_then_an_ignore_eos_budget_then_the_budget() -> None:
    o = OracleLength(default_tokens=77)
    assert o.predict(rq("a", truth=42, budget=500)) == 42
    assert o.predict(rq("b", budget=64, ignore_eos=True)) == 64
    assert o.report()["unknown"] == 0
    assert o.predict(rq("c", budget=500)) == 500
    assert o.predict(rq("d")) == 77
    assert o.report()["unknown"] == 2


@pytest.mark.parametrize("accuracy", [0.0, 0.5, 0.9, 1.0])
def test_noisy_oracles_measured_accuracy_converges_to_its_configured_one(accuracy: float) -> None:
    p = MeasuredPredictor(NoisyOracle(accuracy=accuracy, seed=3))
    for i in range(4000):
        truth = 1 + (i * 37) % 900
        r = rq(f"r{i}", truth=truth)
        p.predict(r)
        p.observe(r, truth)
    measured = p.report()["accuracy"]
    assert abs(measured - accuracy) < 0.03, measured
    if accuracy in (0.0, 1.0):
        assert measured == accuracy  # wrong answers are never within the tolerance, right ones exact


def test_noisy_oracle_is_deterministic_per_request_and_seed() -> None:
    a, b = NoisyOracle(accuracy=0.5, seed=1), NoisyOracle(accuracy=0.5, seed=1)
    reqs = [rq(f"r{i}", truth=100) for i in range(50)]
    answers = [a.predict(r) for r in reqs]
    assert answers == [b.predict(r) for r in reversed(reqs)][::-1]  # order does not matter
    assert answers == [a.predict(r) for r in reqs]  # asking twice gives the same answer
    assert answers != [NoisyOracle(accuracy=0.5, seed=2).predict(r) for r in reqs]
    with pytest.raises(ValueError):
        NoisyOracle(accuracy=1.5)
    with pytest.raises(ValueError):
        NoisyOracle(min_error_factor=1.0)


@settings(max_examples=200, deadline=None)
@given(truth=st.integers(0, 100_000), rid=st.text(max_size=8), seed=st.integers(0, 10))
def test_noisy_oracle_wrong_answers_are_never_accurate(truth: int, rid: str, seed: int) -> None:
    p = NoisyOracle(accuracy=0.0, seed=seed).predict(rq(rid, truth=truth))
    assert p >= 1 and not is_accurate(p, truth)


def test_learned_backs_off_from_the_system_prompt_to_the_prompt_length_to_the_default() -> None:
    p = LearnedLength(min_samples=3, default_tokens=99)
    assert p.predict(rq("x", [*SYSTEM_A, 1, 2, 3])) == 99  # nothing learned
    for i in range(5):  # app A answers ~20 tokens, app B ~400: same prompt length, same budget
        p.learn(rq(f"a{i}", SYSTEM_A + [i] * 30, budget=1000), 20)
        p.learn(rq(f"b{i}", SYSTEM_B + [i] * 30, budget=1000), 400)
    assert p.predict(rq("a", SYSTEM_A + [9] * 30, budget=1000)) == 20
    assert p.predict(rq("b", SYSTEM_B + [9] * 30, budget=1000)) == 400
    # Same system prompt, another length: the prefix level still knows the app.
    assert p.predict(rq("b2", SYSTEM_B + [9] * 300, budget=1000)) == 400
    # An unseen system prompt of the same shape: the (prompt, budget) level, a geometric mean of both.
    unseen = p.predict(rq("c", list(range(5000, 5158)), budget=1000))
    assert 20 < unseen < 400 and unseen == pytest.approx((21 * 401) ** 0.5 - 1, abs=1)
    # The budget caps a prediction; ignore_eos answers the budget and is not learned from.
    assert p.predict(rq("d", SYSTEM_B + [9] * 30, budget=50)) <= 50
    learned = p.report()["learned_from"]
    assert p.predict(rq("e", SYSTEM_B, budget=7, ignore_eos=True)) == 7
    p.learn(rq("e", SYSTEM_B, budget=7, ignore_eos=True), 7)
    assert p.report()["learned_from"] == learned
    assert p.report()["answered_by"]["ignore_eos"] == 1


def test_learned_separates_namespaces() -> None:
    p = LearnedLength(min_samples=2)
    for i in range(4):
        p.learn(rq(f"a{i}", 50, salt="t1", budget=512), 10)
        p.learn(rq(f"b{i}", 50, salt="t2", budget=512), 300)
    assert p.predict(rq("a", 50, salt="t1", budget=512)) == 10
    assert p.predict(rq("b", 50, salt="t2", budget=512)) == 300


def test_learned_follows_drift_and_has_bounded_memory() -> None:
    p = LearnedLength(min_samples=1, alpha=0.2, max_buckets=8)
    for i in range(200):
        p.learn(rq(f"a{i}", 40, budget=256), 30)
    for i in range(60):
        p.learn(rq(f"b{i}", 40, budget=256), 200)
    assert p.predict(rq("z", 40, budget=256)) == pytest.approx(200, rel=0.02)
    for i in range(500):  # 500 distinct system prompts (and lengths): each level keeps at most 8 buckets
        p.learn(rq(f"c{i}", [i] * 70 + list(range(i % 300)), salt=str(i)), 5)
    assert all(n <= 8 for n in p.report()["buckets"].values())


def test_measured_predictor_scores_what_it_predicted_at_routing_time() -> None:
    p = MeasuredPredictor(LearnedLength(min_samples=1, default_tokens=100), max_pending=2)
    first = rq("r0", 50)
    assert p.predict(first) == 100
    p.observe(first, 10)  # scored 100 vs 10 (not what it would say after learning)
    rep = p.report()
    assert (rep["scored"], rep["accuracy"], rep["mean_abs_error"]) == (1, 0.0, 90.0)
    for i in range(1, 5):
        p.predict(rq(f"r{i}", 50))
    assert p.report()["pending"] == 2  # bounded: a request that never reports back cannot grow it
    p.observe(rq("r1", 50), 10)  # forgotten: scored by what it predicts now (10), before learning
    assert p.report()["accuracy"] == 0.5


@settings(max_examples=100, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), max_size=60),
    tolerance=st.floats(0.0, 2.0),
    window=st.integers(1, 20),
)
def test_accuracy_report_matches_the_errors(
    pairs: list[tuple[int, int]], tolerance: float, window: int
) -> None:
    m = AccuracyMeter(tolerance=tolerance, window=window)
    for predicted, actual in pairs:
        m.add(predicted, actual)
    rep = m.report()
    ok = [is_accurate(p, a, tolerance) for p, a in pairs]
    errs = [abs(p - a) for p, a in pairs]
    assert rep["scored"] == len(pairs)
    if pairs:
        assert rep["accuracy"] == pytest.approx(sum(ok) / len(ok))
        assert rep["mean_abs_error"] == pytest.approx(sum(errs) / len(errs))
        assert rep["recent"]["scored"] == min(window, len(pairs))
        assert rep["recent"]["accuracy"] == pytest.approx(sum(ok[-window:]) / len(ok[-window:]))
        assert rep["recent"]["mean_abs_error"] == pytest.approx(sum(errs[-window:]) / len(errs[-window:]))
    else:
        assert rep["accuracy"] is None and rep["mean_abs_error"] is None


def test_make_predictor() -> None:
    assert set(PREDICTORS) == {"oracle", "noisy_oracle", "learned"}
    p = make_predictor("noisy_oracle", accuracy=0.8, seed=5)
    assert isinstance(p, NoisyOracle) and p.accuracy == 0.8
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("crystal_ball")
