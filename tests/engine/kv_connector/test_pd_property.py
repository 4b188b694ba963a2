"""Property: whatever the JE and the engines go through — random submits, aborts at random phases (queued on
the prefill side, prefilling, transferring, decoding), deadlines passing, either engine killed — afterwards
every block on every engine is free and no connector state is left; and every request that both sides
completed produced exactly the colocated engine's greedy tokens (so no decode ever ran on KV that had not
fully arrived, nor on KV written into reused blocks)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deepflow.engine.config import EngineConfig
from deepflow.engine.core import EngineCore
from deepflow.engine.kv_transfer import KVMode
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from tests.engine.kv_connector.conftest import FakeClock, assert_clean, engine_config
from tests.engine.kv_connector.pd import PDDriver

OPTIONS = dict(max_num_batched_tokens=8, num_kv_blocks=40, block_size=4, kv_quarantine_s=60.0)
DRAIN_ROUNDS = 5_000
_PREFIXES = [random.Random(k).sample(range(3, 500), 24) for k in range(3)]
_ids = itertools.count()

submit = st.tuples(
    st.just("submit"),
    st.sampled_from([None, 0, 1, 2]),  # a shared prefix (prefix hits on either side), or none
    st.integers(0, 24),
    st.lists(st.integers(3, 499), min_size=1, max_size=16),
    st.integers(1, 5),  # max_tokens
    st.sampled_from(list(KVMode)),
)
action = st.one_of(
    submit,
    st.tuples(st.just("step"), st.integers(1, 6)),
    st.tuples(st.sampled_from(["abort", "abort_p", "abort_d"]), st.integers(0, 20)),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 10.0, 31.0, 61.0])),
    st.tuples(st.just("kill"), st.sampled_from(["p", "d"]), st.booleans()),
)


class World:
    """The engines of the whole test (recreated only when one is killed) and the colocated reference."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.clock = FakeClock()
        self.p = self._engine()
        self.d = self._engine()
        config = EngineConfig(
            model=str(folder), dtype="float32", num_kv_blocks=64, block_size=4, num_host_blocks=0
        )
        config.num_threads, config.pin_threads = 1, False
        self.reference = EngineCore(config)
        self._refs: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def _engine(self) -> EngineCore:
        return EngineCore(engine_config(self.folder, **OPTIONS), clock=self.clock)

    def expected(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self._refs:
            rid = f"ref{next(_ids)}"
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            self.reference.add_request(
                EngineCoreRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params)
            )
            tokens: list[int] = []
            while self.reference.has_work():
                for out in self.reference.step():
                    tokens.extend(out.new_token_ids)
            self._refs[key] = tokens
        return self._refs[key]

    def close(self) -> None:
        for core in (self.p, self.d, self.reference):
            core.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):  # type: ignore[no-untyped-def]
    from tests.conftest import make_tiny_model

    w = World(make_tiny_model("qwen2-bias-gqa3", tmp_path_factory.mktemp("pd-property")))
    yield w
    w.close()


def phase(driver: PDDriver, rid: str) -> str:
    """Where a request is, for the statistics: each side's connector state (or gone)."""
    p = driver.p.scheduler.kv.producers.get(rid)  # type: ignore[union-attr]
    d = driver.d.scheduler.kv.consumers.get(rid)  # type: ignore[union-attr]
    return f"P {p.state.value if p else '-'} / D {d.state.value if d else '-'}"


def run_actions(world: World, actions: list) -> None:  # type: ignore[type-arg]
    driver = PDDriver(world.p, world.d)
    ids: list[str] = []
    specs: dict[str, tuple[list[int], int]] = {}
    lost: set[str] = set()  # requests that met a killed engine
    for act in actions:
        kind = act[0]
        if kind == "submit":
            _, prefix, cut, suffix, max_tokens, mode = act
            prompt = (_PREFIXES[prefix][:cut] if prefix is not None else []) + suffix
            rid = f"q{next(_ids)}"
            driver.mode = mode
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            driver.submit(rid, prompt, params)
            ids.append(rid)
            specs[rid] = (prompt, max_tokens)
        elif kind == "step":
            for _ in range(act[1]):
                driver.step()
        elif kind in ("abort", "abort_p", "abort_d") and ids:
            # Mostly a request still in flight (the phases that matter); now and then any, finished ones too.
            live = [r for r in ids if not driver.requests[r].done]
            pool = live if live and act[1] % 5 else ids
            rid = pool[act[1] % len(pool)]
            event(f"{kind} while {phase(driver, rid)}")
            if kind in ("abort", "abort_p"):
                for out in driver.p.abort([rid]):
                    driver.on_p(out)
            if kind in ("abort", "abort_d"):
                for out in driver.d.abort([rid]):
                    driver.on_d(out)
        elif kind == "advance":
            world.clock.advance(act[1])
        elif kind == "kill":
            _, side, je_aborts = act
            dead = world.p if side == "p" else world.d
            dead.shutdown()
            fresh = world._engine()
            if side == "p":
                world.p = driver.p = fresh
            else:
                world.d = driver.d = fresh
            # What the JE does when a TE dies: its requests there are gone; it aborts their other half
            # (or, when `je_aborts` is False, leaves it to that side's own deadlines).
            for rid, req in driver.requests.items():
                if req.done:
                    continue
                lost.add(rid)
                if side == "p":
                    req.p_final = req.p_final or "lost"  # type: ignore[assignment]
                    if je_aborts:
                        for out in driver.d.abort([rid]):
                            driver.on_d(out)
                else:
                    req.d_final = req.d_final or "lost"  # type: ignore[assignment]
                    if je_aborts:
                        for out in driver.p.abort([rid]):
                            driver.on_p(out)
        driver.step()  # the engines move between any two things the JE does
    # Drain: step until both engines are idle, letting every deadline pass when nothing else moves.
    for i in range(DRAIN_ROUNDS):
        if not (driver.p.has_work() or driver.d.has_work()):
            break
        driver.step()
        if i % 200 == 199:
            world.clock.advance(100.0)  # past every lease, timeout and quarantine
    else:
        raise AssertionError("the engines never went idle")
    assert_clean(driver.p, driver.d)
    for rid, req in driver.requests.items():
        ok_p = req.p_final not in (None, "lost") and req.p_final.kv_transferred  # type: ignore[union-attr]
        ok_d = req.d_final not in (None, "lost") and req.d_final.error_type is None  # type: ignore[union-attr]
        ok_d = ok_d and req.d_final.finish_reason != "abort"  # type: ignore[union-attr]
        if ok_p and ok_d and rid not in lost:
            prompt, max_tokens = specs[rid]
            assert req.tokens == world.expected(prompt, max_tokens), rid
            event("completed through P and D")
        else:
            event("ended otherwise")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(action, min_size=1, max_size=30))
def test_pd_frees_every_block_whatever_happens(world: World, actions: list) -> None:  # type: ignore[type-arg]
    run_actions(world, actions)
