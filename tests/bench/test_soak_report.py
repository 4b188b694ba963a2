"""The soak's report and verdict on synthetic samples (no server): errors, KV back to its idle baseline,
RSS growth after warm-up, processes that exited or restarted."""

from __future__ import annotations

import json
from collections import Counter

from benchmarks.soak import (
    OK,
    OK_CAP,
    KVReading,
    Results,
    Shares,
    errors,
    report,
    rss_growth,
    to_json,
    verdict,
)

JE, TE = "je-0 (pid 11)", "te-0 (pid 12)"


def passing() -> Results:
    """A clean 100 s run: RSS climbs during warm-up (the first 20 s), then stays within 1%."""
    r = Results(load_s=100.0, duration_s=104.0)
    for t in (0.0, 10.0, 20.0, 60.0, 100.0):
        r.rss_rounds.append(t)
    r.rss[JE] = [(0.0, 100), (10.0, 300), (20.0, 400), (60.0, 402), (100.0, 403)]
    r.rss[TE] = [(0.0, 1000), (10.0, 2000), (20.0, 2000), (60.0, 2010), (100.0, 2019)]
    r.kv_baseline = {"te-0": KVReading(blocks_in_use=0, num_blocks=2912, pinned_tokens=0)}
    r.kv_end = {"te-0": KVReading(blocks_in_use=0, num_blocks=2912, pinned_tokens=0)}
    for t, kind, outcome, tokens in [
        (1.0, "shared", OK, 30),
        (2.0, "random", OK, 20),
        (3.0, "context", OK, 16),
        (4.0, "context", OK_CAP, 0),  # over the pinned-token cap: a correct answer
        (5.0, "disconnect", OK, 3),
        (70.0, "malformed", OK, 0),  # answered 4xx
    ]:
        r.record(kind, outcome, t, tokens)
    r.malformed["bad_json"]["400"] += 1
    r.te_load["te-0"] = [(0.0, 10, 2), (50.0, 12, 0)]
    return r


def test_a_clean_run_passes() -> None:
    r = passing()
    assert errors(r) == {} and verdict(r) == []
    text = report(r)
    assert text.splitlines()[-1] == "PASS"
    assert "| context | 2 | 2 (1 x 429 cap) | 0 | - |" in text
    assert "| bad_json | 1 | 1 (400) | - |" in text
    assert "| 0 | 60 | 5 | 0.08 | 1.1 | 0 |" in text and "| 1 | 44 | 1 | 0.02 | 0.0 | 0 |" in text
    json.dumps(to_json(r))  # the JSON report is serializable


def test_growth_is_measured_from_the_end_of_warm_up() -> None:
    # The climb from 100 to 400 is warm-up (before 20 s); 400 -> 403 is what counts.
    assert rss_growth(passing().rss[JE], 100.0) == 403 / 400 - 1
    assert rss_growth([(50.0, 1)], 100.0) is None  # one sample past warm-up: nothing to compare
    assert rss_growth([(5.0, 1), (50.0, 2)], 100.0) is None  # the first sample is inside warm-up


def test_rss_growth_of_5_percent_fails() -> None:
    r = passing()
    r.rss[TE][-1] = (100.0, 2100)  # 2000 after warm-up -> 2100: +5.0%
    assert verdict(r) == [f"{TE} RSS grew +5.0% after warm-up (limit 5%)"]
    r.rss[TE][-1] = (100.0, 2099)
    assert verdict(r) == []
    assert verdict(r, rss_limit=0.01) == [f"{TE} RSS grew +5.0% after warm-up (limit 1%)"]


def test_errors_fail_by_kind_and_outcome_malformed_5xx_included() -> None:
    r = passing()
    r.record("malformed", "lone_surrogate_chat HTTP 500", 80.0)
    r.malformed["lone_surrogate_chat"]["500"] += 1
    r.record("shared", "ReadTimeout", 81.0)
    r.record("shared", "ReadTimeout", 82.0)
    r.record("context", "delete HTTP 500", 83.0)
    reasons = verdict(r)
    assert reasons == [
        "2 x shared: ReadTimeout",
        "1 x context: delete HTTP 500",
        "1 x malformed: lone_surrogate_chat HTTP 500",
    ]
    text = report(r)
    assert text.splitlines()[-1].startswith("FAIL: 2 x shared: ReadTimeout")
    assert "| lone_surrogate_chat | 1 | 0 (-) | 500: 1 |" in text
    assert "| 1 | 44 | 5 | 0.11 | 0.0 | 4 |" in text  # the errors per minute


def test_a_short_drain_is_folded_into_the_last_minute() -> None:
    r = passing()
    r.duration_s = 125.0  # minute 2 holds 5 s of drain
    r.record("shared", OK, 122.0, 40)
    text = report(r)
    assert "| 1-2 | 65 | 2 | 0.03 | 0.6 | 0 |" in text and "\n| 2 |" not in text


def test_kv_not_back_to_baseline_fails() -> None:
    r = passing()
    r.kv_end = {"te-0": KVReading(blocks_in_use=7, num_blocks=2912, pinned_tokens=96)}
    assert verdict(r) == [
        "te-0: 7 KV blocks in use at the end vs 0 idle",
        "te-0: 96 pinned context tokens at the end vs 0",
    ]
    r.kv_end = None
    assert verdict(r) == ["KV usage unknown (no /v1/cluster reading)"]
    r.kv_end = {}
    assert verdict(r) == ["te-0: no KV reading at the end"]
    r.kv_end = {"te-0": KVReading(0, 2912, 0, restarts=1)}
    assert verdict(r) == ["te-0: restarted 1 time(s) during the run"]


def test_a_process_that_exits_or_restarts_fails() -> None:
    r = passing()
    r.rss[TE] = r.rss[TE][:3]  # last seen at 20 s
    r.rss["te-0 (pid 13)"] = [(60.0, 2000), (100.0, 2001)]  # its successor
    r.rss["worker (tokenizer/worker of je-0) (pid 14)"] = [(60.0, 50), (100.0, 50)]  # workers start lazily
    assert verdict(r) == [
        "te-0 (pid 12) exited during the run (last seen at 20 s)",
        "te-0 (pid 13) started during the run (at 60 s): a restart",
    ]


def test_no_traffic_or_no_rss_or_leftover_contexts_fail() -> None:
    r = Results(load_s=10.0, duration_s=10.0)
    r.kv_baseline = r.kv_end = {"te-0": KVReading(0, 1, 0)}
    assert verdict(r) == ["no request was served", "RSS not sampled (no process tree)"]
    r = passing()
    r.contexts_left = 2
    assert verdict(r) == ["2 context(s) the soak made were not deleted in the run"]


def test_shares_pick_kinds_in_proportion() -> None:
    import random

    rng = random.Random(0)
    shares = Shares(shared_prefix=0.3, context=0.1, disconnect=0.1, malformed=0.2)
    counts = Counter(shares.kind(rng) for _ in range(20_000))
    assert abs(counts["random"] / 20_000 - 0.3) < 0.02 and abs(counts["malformed"] / 20_000 - 0.2) < 0.02
    assert Counter(Shares(0, 0, 0, 0).kind(rng) for _ in range(100)) == Counter(random=100)
