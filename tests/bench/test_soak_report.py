"""The soak's verdict on synthetic samples: errors, KV back to its baseline, RSS growth after warm-up."""

from __future__ import annotations

from collections import Counter

from benchmarks.soak import Results, errors, report, rss_growth, verdict


def passing() -> Results:
    results = Results(kv_baseline=0.0, kv_end=0.0, duration_s=100.0)
    results.outcomes["shared"] = Counter(ok=40)
    results.outcomes["malformed"] = Counter(ok=7)  # malformed requests answered 4xx count as ok
    results.rss["je je-0 (pid 1)"] = [(0.0, 100), (10.0, 300), (20.0, 400), (60.0, 404), (100.0, 410)]
    results.requests_per_minute[0], results.tokens_per_minute[0] = 47, 900
    return results


def test_a_clean_run_passes() -> None:
    results = passing()
    assert verdict(results) == [] and errors(results) == {}
    assert report(results).splitlines()[-1] == "PASS"


def test_growth_is_measured_from_the_end_of_warm_up() -> None:
    # The first 20% (here 20 s) is warm-up: the climb from 100 to 400 does not count, 400 -> 410 does.
    assert rss_growth(passing().rss["je je-0 (pid 1)"], 100.0) == 410 / 400 - 1
    assert rss_growth([(50.0, 1)], 100.0) is None  # one sample: nothing to compare


def test_each_failure_is_named() -> None:
    results = passing()
    results.outcomes["malformed"]["HTTP 500"] = 2
    results.outcomes["shared"]["ReadTimeout"] = 1
    results.kv_end = 0.01
    results.rss["te te-0 (pid 2)"] = [(30.0, 1000), (100.0, 1050)]
    reasons = verdict(results)
    assert "2 x malformed: HTTP 500" in reasons and "1 x shared: ReadTimeout" in reasons
    assert any(r.startswith("KV usage 0.0100 at the end") for r in reasons)
    assert "te te-0 (pid 2) RSS grew 5.0% after warm-up" in reasons
    assert report(results).splitlines()[-1].startswith("FAIL: ")
    results.kv_end = None
    assert "KV usage unknown" in verdict(results)
