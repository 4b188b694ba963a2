"""End to end against the fake OpenAI-compatible SSE server, on virtual time: exact latencies, no wall clock.

`run` serves the fake in-process (an httpx transport, no sockets) on a `VirtualTimeLoop`, and the fake and
the benchmark share one `LoopClock`: the clock jumps to the next timer whenever every task is blocked, so
the benchmark measures exactly the delays the fake sleeps, however busy the machine. Real sockets and real
time are covered by smoke tests that check counts and structure only (`test_real_sockets_smoke`, the CLI).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from deepflow.bench.clock import LoopClock
from deepflow.bench.config import BenchConfig
from deepflow.bench.report import BenchResult
from deepflow.bench.serve import poisson_arrivals, run_benchmark
from deepflow.cli import main
from tests.bench.fake_server import CHAT_OVERHEAD, Behavior, FakeOpenAIServer, fake_token_ids
from tests.bench.virtual_time import run_virtual

TTFT, ITL = 0.05, 0.01


def settings_for(server: FakeOpenAIServer, overrides: dict[str, object]) -> BenchConfig:
    settings: dict[str, object] = dict(
        base_url=server.url, model="fake", input_len=16, output_len=8, num_prompts=12, concurrency=4
    )
    settings.update(overrides)
    return BenchConfig(**settings)  # type: ignore[arg-type]


def run(behavior: Behavior, **overrides: object) -> tuple[BenchResult, FakeOpenAIServer]:
    """Benchmark the fake in-process, both on one virtual clock (`/tokenize` still goes over 127.0.0.1)."""

    async def go() -> tuple[BenchResult, FakeOpenAIServer]:
        clock = LoopClock()
        async with FakeOpenAIServer(behavior, clock=clock) as server:
            config = settings_for(server, overrides)
            return await run_benchmark(config, clock=clock, transport=server.transport()), server

    return run_virtual(go())


def since_first(times: list[float]) -> list[float]:
    return [t - times[0] for t in times]


def test_closed_loop_measures_the_servers_delays() -> None:
    result, server = run(Behavior(ttft_s=TTFT, itl_s=ITL), num_prompts=16, concurrency=4)
    assert server.max_in_flight == 4
    s = result.summary
    assert (s.completed, s.failed, s.errors) == (16, 0, {})
    assert s.total_input_tokens == 16 * 16 and s.total_output_tokens == 16 * 8
    assert all(len(body["prompt"]) == 16 for body in server.requests)  # token-id prompts, exact
    assert all(
        body["ignore_eos"] and body["stream_options"] == {"include_usage": True} for body in server.requests
    )
    # Every request measures exactly the fake's delays (approx: float rounding only).
    e2e = TTFT + 7 * ITL
    for r in result.records:
        assert r.ttft_s == pytest.approx(TTFT) and r.itl_s == pytest.approx([ITL] * 7)
        assert r.e2e_s == pytest.approx(e2e) and r.tpot_s == pytest.approx(ITL)
    for stats, expected in ((s.ttft_ms, TTFT), (s.itl_ms, ITL), (s.tpot_ms, ITL), (s.e2e_ms, e2e)):
        assert stats is not None
        assert (stats.mean, stats.p50, stats.p99, stats.max) == pytest.approx((expected * 1e3,) * 4)
    assert s.itl_ms is not None and s.itl_ms.count == 16 * 7
    # 16 requests of 120 ms through 4 workers: 4 waves, each request sent the moment its worker is free.
    waves = [wave * e2e for wave in range(4) for _ in range(4)]
    assert sorted(r.start_s for r in result.records) == pytest.approx(waves)  # type: ignore[type-var]
    assert since_first(server.arrivals) == pytest.approx(waves)  # the fake saw them at those times
    assert s.duration_s == pytest.approx(4 * e2e)
    assert s.request_throughput == pytest.approx(16 / (4 * e2e))
    assert s.cache_hit_fraction == 0.0  # random prompts share no block
    assert [r.index for r in result.records] == list(range(16))


def test_failures_are_counted_by_kind() -> None:
    # Request numbers 4, 8, 12 answer 500; 5 and 10 break off with an error event; 11 hangs.
    behavior = Behavior(ttft_s=0.02, itl_s=0.005, fail_every=4, error_event_every=5, hang_every=11)
    result, server = run(behavior, num_prompts=12, concurrency=3, timeout=0.6)
    assert len(server.requests) == 12
    s = result.summary
    assert (s.num_requests, s.completed, s.failed) == (12, 6, 6)
    assert s.errors == {"HTTP 500": 3, "stream error": 2, "timeout": 1}
    failed = [r for r in result.records if not r.success]
    assert all(r.error for r in failed)
    assert all(r.ttft_s is None for r in failed if r.error_kind != "stream error")
    assert any("injected failure" in (r.error or "") for r in failed)
    assert s.total_output_tokens == 6 * 8  # only successful requests count


def test_open_loop_follows_the_seeded_poisson_schedule() -> None:
    behavior = Behavior(ttft_s=0.1, itl_s=0.005)
    result, server = run(behavior, num_prompts=15, concurrency=None, rps=40.0, seed=7)
    planned = poisson_arrivals(15, 40.0, seed=7)
    # Each request starts exactly at its planned arrival, and reaches the fake then.
    assert [r.start_s for r in result.records] == pytest.approx(planned)
    assert since_first(server.arrivals) == pytest.approx(planned)
    request_s = 0.1 + 7 * 0.005
    assert all(r.e2e_s == pytest.approx(request_s) for r in result.records)
    # Arrivals do not wait for answers: 135 ms requests overlap as the schedule says, and the run ends
    # with the last arrival's request, far sooner than 15 requests one after another.
    overlapping = max(sum(p <= q < p + request_s for p in planned) for q in planned)
    assert server.max_in_flight == overlapping > 1
    assert result.summary.duration_s == pytest.approx(planned[-1] + request_s)
    assert planned[-1] + request_s < 15 * request_s
    assert result.summary.completed == 15
    assert result.config.describe_load() == "open loop, Poisson 40 requests/s"


def test_shared_prefix_cache_hits() -> None:
    behavior = Behavior(ttft_s=0.01, itl_s=0.002, block_size=16)
    result, server = run(behavior, dataset="shared-prefix", prefix_len=64, input_len=32, num_prompts=10)
    prompts = [body["prompt"] for body in server.requests]
    assert len({tuple(p[:64]) for p in prompts}) == 1 and all(len(p) == 96 for p in prompts)
    s = result.summary
    # Every prompt after the first finds the 64-token prefix (4 blocks) cached.
    assert s.total_cached_tokens == 9 * 64 and s.cache_hit_fraction == pytest.approx(9 * 64 / (10 * 96))


def test_multi_turn_sends_growing_histories() -> None:
    behavior = Behavior(ttft_s=0.01, itl_s=0.002)
    result, server = run(
        behavior, dataset="multi-turn", num_prompts=4, num_turns=3, prefix_len=24, input_len=8, concurrency=2
    )
    assert server.max_in_flight == 2
    assert result.summary.completed == 12 and result.config.path == "/v1/chat/completions"
    by_conversation: dict[str, list[list[dict[str, str]]]] = {}
    for body in server.requests:
        messages = body["messages"]
        assert messages[0]["role"] == "system" and len(fake_token_ids(messages[0]["content"])) == 24
        by_conversation.setdefault(messages[1]["content"], []).append(messages)
    assert len(by_conversation) == 4 and len({m[0][0]["content"] for m in by_conversation.values()}) == 1
    answer = "".join(f" w{i}" for i in range(8))
    for turns in by_conversation.values():
        assert [len(m) for m in turns] == [2, 4, 6]
        for before, after in itertools.pairwise(turns):
            assert after[: len(before)] == before
            assert after[len(before)] == {"role": "assistant", "content": answer}
            assert after[-1]["role"] == "user" and len(fake_token_ids(after[-1]["content"])) == 8
    records = [r for r in result.records if r.session == 0]
    assert [r.prompt_len for r in records] == [24 + 8, 24 + 8 + 8 + 8, 24 + 3 * 8 + 2 * 8]
    assert [r.prompt_tokens for r in records] == [
        r.prompt_len + CHAT_OVERHEAD * (2 * r.turn + 2) for r in records
    ]


def test_multi_turn_failure_skips_the_rest_of_the_conversation() -> None:
    behavior = Behavior(ttft_s=0.005, itl_s=0.001, fail_every=2)
    result, server = run(
        behavior, dataset="multi-turn", num_prompts=1, num_turns=4, prefix_len=0, input_len=4
    )
    assert len(server.requests) == 2  # turn 1 failed: turns 2 and 3 were never sent
    assert [r.error_kind for r in result.records] == [None, "HTTP 500", "not sent", "not sent"]
    assert [r.start_s is None for r in result.records] == [False, False, True, True]
    assert result.summary.errors == {"HTTP 500": 1, "not sent": 2}


def test_server_without_usage_or_tokenize(smollm2_dir: Path) -> None:
    """Output tokens fall back to chunk counts; prompts come from the embedded model's tokenizer."""
    behavior = Behavior(ttft_s=0.005, itl_s=0.001, report_usage=False, tokenize=False)
    result, _ = run(behavior, num_prompts=3, endpoint="chat")
    assert "local folder" in result.tokenizer and str(smollm2_dir) in result.tokenizer
    s = result.summary
    assert s.completed == 3 and s.total_output_tokens == 3 * 8 and s.cache_hit_fraction is None
    assert s.total_input_tokens == 3 * 16  # no usage: our own prompt lengths


def test_explicit_tokenizer_chat_prompts_are_exact(smollm2_dir: Path) -> None:
    from deepflow.bench.tokens import LocalTokenizer

    tokenizer = LocalTokenizer(smollm2_dir)
    behavior = Behavior(ttft_s=0.005, itl_s=0.001)
    result, server = run(behavior, num_prompts=4, endpoint="chat", input_len=40, tokenizer=str(smollm2_dir))
    assert server.tokenize_calls == 0
    for body in server.requests:
        (message,) = body["messages"]
        assert len(tokenizer.encode(message["content"])) == 40
    assert all(r.prompt_len == 40 for r in result.records)


def test_warmup_requests_are_sent_but_not_counted() -> None:
    behavior = Behavior(ttft_s=0.005, itl_s=0.001)
    result, server = run(behavior, num_prompts=5, warmup=3, dataset="shared-prefix", prefix_len=32)
    assert len(server.requests) == 8
    assert result.summary.num_requests == 5 and result.summary.warmup_requests == 3
    assert result.summary.total_cached_tokens == 4 * 32  # warm-up prompts did not pre-fill the prefix


def test_real_sockets_smoke() -> None:
    """The real path: httpx over 127.0.0.1, the default clock. Counts and structure only, no timing."""

    async def go() -> tuple[BenchResult, FakeOpenAIServer]:
        async with FakeOpenAIServer(Behavior(ttft_s=0.005, itl_s=0.001)) as server:
            return await run_benchmark(settings_for(server, dict(num_prompts=8, concurrency=2))), server

    result, server = asyncio.run(go())
    assert len(server.requests) == 8 and 1 <= server.max_in_flight <= 2
    s = result.summary
    assert (s.completed, s.failed, s.errors) == (8, 0, {}) and s.total_output_tokens == 8 * 8
    assert s.itl_ms is not None and s.itl_ms.count == 8 * 7
    for r in result.records:
        assert r.start_s is not None and r.ttft_s is not None and r.e2e_s is not None and len(r.itl_s) == 7
    assert [r.index for r in result.records] == list(range(8))


def test_cli_table_json_and_api_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs" / "a.json"
    with FakeOpenAIServer(Behavior(ttft_s=0.01, itl_s=0.002, api_key="k1", fail_every=3)) as server:
        argv = ["bench", "serve", "--base-url", server.url + "/v1", "--model", "fake", "--api-key", "k1"]
        argv += ["--dataset", "random", "--input-len", "8", "--output-len", "4", "--num-prompts", "6"]
        argv += ["--rps", "100", "--seed", "3", "--json", str(out), "--label", "fake-a", "--no-progress"]
        assert main(argv) == 0
    printed = capsys.readouterr().out
    for needle in ("fake-a", "Successful requests:              4 of 6", "HTTP 500 x2", "TTFT"):
        assert needle in printed
    data = json.loads(out.read_text())
    assert set(data) == {
        "label",
        "deepflow_version",
        "started_at",
        "url",
        "tokenizer",
        "config",
        "summary",
        "requests",
    }
    assert data["config"]["rps"] == 100 and data["config"]["api_key"] == "***"
    assert data["summary"]["completed"] == 4 and len(data["requests"]) == 6
    assert {r["error_kind"] for r in data["requests"]} == {None, "HTTP 500"}


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeOpenAIServer(Behavior(ttft_s=0.001, itl_s=0.001, fail_every=1)) as server:
        argv = ["bench", "serve", "--base-url", server.url, "--model", "fake", "--no-progress"]
        argv += ["--input-len", "4", "--output-len", "2", "--num-prompts", "3"]
        assert main(argv) == 1  # nothing succeeded
        assert main([*argv, "--dataset", "multi-turn", "--endpoint", "completions"]) == 2
    assert "multi-turn conversations need --endpoint chat" in capsys.readouterr().err
