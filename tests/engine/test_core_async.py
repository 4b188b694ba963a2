"""EngineCore's overlap loop: a long step is collected before the next plan, so arrivals join the next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deepflow.engine.config import EngineConfig
from deepflow.engine.core import EngineCore
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama-untied-mha", tmp_path_factory.mktemp("core-async"))


def _request(rid: str, length: int) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=rid,
        prompt_token_ids=list(range(3, 3 + length)),
        sampling_params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
        eos_token_ids=[2],
    )


def _steps_until_b_runs(tiny_dir: Path, max_step_tokens: int | None) -> tuple[int, list[list[str]]]:
    """Submit a 40-token prompt a and call step() twice, as the core loop does right away, then submit b (it
    arrives while a's prefill runs: the second call waits for that step): the first executed step with b."""
    core = EngineCore(
        EngineConfig(model=str(tiny_dir), dtype="float32", async_max_step_tokens=max_step_tokens)
    )
    executed: list[list[str]] = []
    inner = core.runner.execute

    def record(scheduled: Any) -> Any:
        executed.append(sorted(scheduled.num_scheduled_tokens))
        return inner(scheduled)

    core.runner.execute = record  # type: ignore[method-assign]
    try:
        core.add_request(_request("a", 40))
        core.step()  # a's prefill launched (40 tokens)
        core.step()  # overlapped: a's first decode planned and launched, then the prefill collected
        core.add_request(_request("b", 3))
        for _ in range(20):
            if not core.has_work():
                break
            core.step()
        assert not core.has_work()
        return next(i for i, ids in enumerate(executed) if "b" in ids), executed
    finally:
        core.shutdown()


def test_an_arrival_during_a_long_step_joins_the_next_step(tiny_dir: Path) -> None:
    index, executed = _steps_until_b_runs(tiny_dir, max_step_tokens=16)
    assert executed[0] == ["a"]
    assert index == 1, executed  # right after a's prefill, beside a's first decode


def test_always_overlapping_plans_one_step_ahead(tiny_dir: Path) -> None:
    # The cost the threshold removes: step 1 (a's decode) was planned before b arrived.
    index, executed = _steps_until_b_runs(tiny_dir, max_step_tokens=None)
    assert executed[:2] == [["a"], ["a"]]
    assert index == 2, executed
