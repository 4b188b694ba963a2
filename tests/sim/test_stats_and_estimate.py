"""`Scheduler.stats()` is a pure read (the populate latencies are drained by `step_stats` alone), the sim
TE's light report carries the same loads, and the routed-load estimate is the routing client's formula."""

from __future__ import annotations

from deepflow.cache.rtc import RelationalTensorCache
from deepflow.engine.request import EngineCoreRequest, ModelRunnerOutput, SchedulerStats
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import Scheduler, SchedulerConfig
from deepflow.platform.je.policies import TELoad, estimated_load, routed_tokens


def scheduler() -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_model_len=256), RelationalTensorCache(32, 4)
    )


def add(s: Scheduler, rid: str, n: int, max_tokens: int = 4) -> None:
    s.add_request(
        EngineCoreRequest(
            request_id=rid,
            prompt_token_ids=list(range(1, n + 1)),
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
    )


def test_stats_is_a_pure_read_and_step_stats_drains() -> None:
    s = scheduler()
    add(s, "a", 10)
    out = s.schedule()
    s.update_from_output(ModelRunnerOutput(request_ids=["a"], sampled_token_ids=[7], logprobs=[None]))
    assert out.total_num_scheduled_tokens == 10
    s.cache.stats.populate_latencies.extend([0.5, 0.25])
    first, second = s.stats(), s.stats()
    assert first == second and first.populate_latencies == []
    assert s.cache.stats.populate_latencies == [0.5, 0.25]  # nothing drained by a read
    drained = s.step_stats()
    assert drained.populate_latencies == [0.5, 0.25]
    assert s.step_stats().populate_latencies == [] and s.take_populate_latencies() == []
    assert drained.num_running == first.num_running == 1
    assert drained.outstanding_tokens == first.outstanding_tokens == 1 + 3  # one to compute, 3 to sample


def test_light_report_has_the_loads_of_stats() -> None:
    from deepflow.engine.config import EngineConfig
    from deepflow.sim.costmodel import HardwareProfile
    from deepflow.sim.events import EventLoop
    from deepflow.sim.runner import PseudoTokens, SimRunner
    from deepflow.sim.te import SimTE

    profile = HardwareProfile({"const": 0.01, "tokens": 1e-4})
    reports: list[tuple[SchedulerStats, SchedulerStats]] = []
    te: SimTE

    def emit(te_: SimTE, outputs: list, stats: SchedulerStats, events: list) -> None:
        reports.append((stats, te_.scheduler.stats()))

    loop = EventLoop()
    config = EngineConfig(num_kv_blocks=64, max_num_batched_tokens=32, kv_events=True)
    te = SimTE("t", config, profile.model, SimRunner(profile, PseudoTokens(2)), loop, emit)
    for i in range(5):
        loop.at(
            0.003 * i,
            te.add_request,
            EngineCoreRequest(
                request_id=f"r{i}",
                prompt_token_ids=list(range(3, 40 + i)),
                eos_token_ids=[2],
                sampling_params=SamplingParams(max_tokens=6, ignore_eos=True),
            ),
        )
    loop.run()
    assert len(reports) > 5
    for light, full in reports:
        assert (light.num_running, light.num_waiting, light.outstanding_tokens) == (
            full.num_running,
            full.num_waiting,
            full.outstanding_tokens,
        )


def test_routed_load_estimate() -> None:
    assert routed_tokens(100, 64, 16) == 36 + 16
    assert routed_tokens(10, 10, None) == 1  # at least one token: the last one is always computed
    idle = estimated_load("a", None, 0, True)
    assert idle == TELoad("a", 0, 0, 0, 0.0, True)
    stats = SchedulerStats(
        num_running=2,
        num_waiting=1,
        outstanding_tokens=500,
        kv_cache_usage=0.5,
        num_preemptions_total=0,
        prefix_cache_queries_total=0,
        prefix_cache_hits_total=0,
    )
    assert estimated_load("b", stats, 40, False) == TELoad("b", 2, 2, 540, 0.5, False)
    assert estimated_load("b", stats, 0, True).num_waiting == 1
