"""The real engine core (tiny model, real runner) under random submits and aborts: nothing may leak."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepflow.engine.config import EngineConfig
from deepflow.engine.core import EngineCore
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2-bias-gqa3", tmp_path_factory.mktemp("lifecycle"))


# async: always overlapped; async-long: steps over 8 tokens collected before the next plan; sync.
@pytest.fixture(
    scope="module", params=[(True, None), (True, 8), (False, None)], ids=["async", "async-long", "sync"]
)
def config(request: pytest.FixtureRequest, tiny_dir: Path) -> EngineConfig:
    async_scheduling, max_step_tokens = request.param
    return EngineConfig(
        model=str(tiny_dir),
        dtype="float32",
        num_kv_blocks=20,
        block_size=4,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        async_scheduling=async_scheduling,
        async_max_step_tokens=max_step_tokens,
    )


_ids = itertools.count()  # unique across examples: the core is shared by the whole module

# Seeded, so that a failing example replays identically.
params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.8]),
    top_p=st.sampled_from([1.0, 0.9]),
    seed=st.integers(0, 100),
    max_tokens=st.integers(1, 12),
    min_tokens=st.integers(0, 1),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    logprobs=st.sampled_from([None, 2]),
    ignore_eos=st.booleans(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_submits_and_aborts_free_everything(config: EngineConfig, data: st.DataObject) -> None:
    core = EngineCore(config)  # a fresh engine per example, so a failure replays exactly
    try:
        _exercise(core, data)
    finally:
        core.shutdown()


def _exercise(core: EngineCore, data: st.DataObject) -> None:
    live: set[str] = set()
    for _ in range(data.draw(st.integers(3, 25))):
        action = data.draw(st.sampled_from(["submit", "submit", "abort", "step", "step", "step"]))
        if action == "submit":
            rid = f"q{next(_ids)}"
            prompt = data.draw(st.lists(st.integers(3, 500), min_size=1, max_size=30))
            core.add_request(
                EngineCoreRequest(
                    request_id=rid,
                    prompt_token_ids=prompt,
                    sampling_params=data.draw(params_strategy),
                    eos_token_ids=[2],
                )
            )
            live.add(rid)
        elif action == "abort":
            # Draw unconditionally: which requests are live depends on (unseeded) sampling.
            pick = data.draw(st.integers(0, 10))
            if live:
                victim = sorted(live)[pick % len(live)]
                core.abort([victim])
                live.discard(victim)
        else:
            for out in core.step():
                if out.finish_reason is not None:
                    live.discard(out.request_id)
    for _ in range(1000):
        if not core.has_work():
            break
        core.step()
    assert not core.has_work()
    assert not core.scheduler.requests
    core.cache.check_consistency()
    assert not core.cache.owners() and core.cache.usage() == 0.0
    assert not core.runner.requests and not core.runner._parked
