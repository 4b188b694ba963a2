"""The simulated TE makes the real engine's scheduling decisions, step for step.

A real `EngineCore` (a tiny random model, synchronous scheduling, a KV pool small enough to preempt) runs a
small trace with shared prefixes; then a `SimTE` with the same `EngineConfig` runs it on the virtual clock,
fed back the tokens the real model sampled. Every step's scheduled requests and token counts, admissions
(with their cached tokens), preemptions and forgets must match, and so must the outputs and cache counters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deepflow.engine.config import EngineConfig
from deepflow.engine.request import EngineCoreRequest, SchedulerOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.sim.costmodel import HardwareProfile, ModelShape
from deepflow.sim.events import EventLoop
from deepflow.sim.runner import SimRunner
from deepflow.sim.te import SimTE, engine_layout


def step_record(out: SchedulerOutput) -> dict[str, Any]:
    return {
        "scheduled": dict(sorted(out.num_scheduled_tokens.items())),
        "new": sorted((n.request_id, n.num_computed_tokens, len(n.block_ids)) for n in out.new_requests),
        "grown": sorted((c.request_id, len(c.new_block_ids)) for c in out.cached_requests),
        "preempted": list(out.preempted_request_ids),
        "finished": list(out.finished_request_ids),
        "transfers": [(t.kind, len(t.src)) for t in out.kv_transfers],
    }


def trace() -> list[tuple[int, EngineCoreRequest]]:
    """(step at which it arrives, request): three families of prompts sharing prefixes, some early EOS."""
    prefixes = [list(range(10 + 40 * k, 10 + 40 * k + 40)) for k in range(3)]
    out = []
    for i in range(14):
        prefix = prefixes[i % 3]
        prompt = prefix + [300 + (7 * i + j) % 200 for j in range(5 + (11 * i) % 30)]
        params = SamplingParams(temperature=0.0, max_tokens=12 + (5 * i) % 20, ignore_eos=i % 4 != 0)
        request = EngineCoreRequest(
            request_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params, eos_token_ids=[2]
        )
        out.append(((i * 3) // 2, request))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import make_tiny_model

    return make_tiny_model("llama-untied-mha", tmp_path_factory.mktemp("tiny"))


def config_for(model: Path, async_scheduling: bool = False) -> EngineConfig:
    return EngineConfig(
        model=str(model),
        dtype="float32",
        num_kv_blocks=24,
        num_host_blocks=0,
        block_size=16,
        max_num_seqs=6,
        max_num_batched_tokens=64,
        async_scheduling=async_scheduling,
        kv_events=True,
        num_threads=1,
        pin_threads=False,
    )


def run_real(config: EngineConfig) -> tuple[list[dict[str, Any]], dict[str, list[int]], Any, Any]:
    from deepflow.engine.core import EngineCore

    core = EngineCore(config)
    steps: list[dict[str, Any]] = []
    inner = core.runner.execute

    def execute(out: SchedulerOutput) -> Any:
        steps.append(step_record(out))
        return inner(out)

    core.runner.execute = execute
    tokens: dict[str, list[int]] = {}
    arrivals = trace()
    k = 0
    try:
        while arrivals or core.has_work():
            while arrivals and arrivals[0][0] <= k:
                core.add_request(arrivals.pop(0)[1])
            if core.has_work():
                for output in core.step():
                    tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            k += 1
        layout = (
            core.runner.num_blocks,
            core.runner.num_host_blocks,
            core.max_model_len,
            core.cache.max_context_tokens,
        )
        return steps, tokens, core.scheduler.stats(), layout
    finally:
        core.shutdown()


def run_sim(config: EngineConfig, model: Path, real_tokens: dict[str, list[int]]) -> tuple[Any, ...]:
    shape = ModelShape.from_folder(model, config.dtype)
    # Every step takes exactly one virtual second, so "arrives before step k" is "at time k - 0.5".
    profile = HardwareProfile({"const": 1.0}, model=shape, min_step_seconds=1.0, copy_seconds_per_block=0.0)
    loop = EventLoop()
    steps: list[dict[str, Any]] = []
    tokens: dict[str, list[int]] = {}

    def feed(request_id: str, index: int) -> int:
        return real_tokens[request_id][index]

    runner = SimRunner(profile, feed)
    inner = runner.execute

    def execute(out: SchedulerOutput) -> Any:
        steps.append(step_record(out))
        return inner(out)

    runner.execute = execute  # type: ignore[method-assign]

    def emit(te: SimTE, outputs: list[Any], stats: Any, events: list[Any]) -> None:
        for output in outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)

    te = SimTE("te-0", config, shape, runner, loop, emit, light_reports=False)
    if not config.async_scheduling:
        for k, request in trace():
            loop.at(max(k - 0.5, 0.0), te.add_request, request)
    else:
        # Two passes of the loop per step here (plan N+1, then collect N): arrivals go by pass, as the real
        # loop above adds them before its k-th call of `step` (the trace keeps the engine busy throughout).
        pending = trace()
        take = te._take_commands

        def take_with_arrivals() -> Any:
            while pending and pending[0][0] <= te.num_passes - 1:
                te._inbox.append(pending.pop(0)[1])
            return take()

        te._take_commands = take_with_arrivals  # type: ignore[method-assign]
        te.add_request(pending.pop(0)[1])
    loop.run()
    layout = (
        te.layout.num_blocks,
        te.layout.num_host_blocks,
        te.layout.max_model_len,
        te.layout.max_context_tokens,
    )
    return steps, tokens, te.scheduler.stats(), layout


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_sim_te_matches_the_real_engine_step_for_step(tiny: Path, async_scheduling: bool) -> None:
    config = config_for(tiny, async_scheduling)
    real_steps, real_tokens, real_stats, real_layout = run_real(config)
    sim_steps, sim_tokens, sim_stats, sim_layout = run_sim(config, tiny, real_tokens)
    assert sim_layout == real_layout
    assert len(sim_steps) == len(real_steps)
    for i, (real, sim) in enumerate(zip(real_steps, sim_steps, strict=True)):
        assert sim == real, f"step {i} differs"
    assert sim_tokens == real_tokens
    # The trace exercised what it is meant to compare.
    assert real_stats.num_preemptions_total > 0
    assert real_stats.prefix_cache_hits_total > 0
    for field in (
        "num_preemptions_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "kv_blocks_evicted_total",
    ):
        assert getattr(sim_stats, field) == getattr(real_stats, field), field


def test_engine_layout_matches_the_engine_defaults(tiny: Path) -> None:
    """Pool sizes from bytes (no num_kv_blocks) and the context caps, as EngineCore derives them."""
    from deepflow.engine.core import EngineCore

    config = EngineConfig(
        model=str(tiny),
        dtype="float32",
        kv_cache_memory=1 << 20,
        host_cache_memory=1 << 19,
        max_context_tokens=None,
        num_threads=1,
        pin_threads=False,
    )
    core = EngineCore(config)
    try:
        layout = engine_layout(config, ModelShape.from_folder(tiny, "float32"))
        assert (layout.num_blocks, layout.num_host_blocks) == (
            core.runner.num_blocks,
            core.runner.num_host_blocks,
        )
        assert layout.max_model_len == core.max_model_len
        assert layout.max_context_tokens == core.cache.max_context_tokens
    finally:
        core.shutdown()
