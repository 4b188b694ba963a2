"""Engines for the PD tests: fp32, the KV pool in shared memory, a DistFlow agent each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deepflow.engine.config import EngineConfig
from deepflow.engine.core import EngineCore


class FakeClock:
    """The schedulers' clock in tests: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def engine_config(folder: Path, **options) -> EngineConfig:  # type: ignore[no-untyped-def]
    base = dict(
        model=str(folder),
        dtype="float32",
        kv_transfer=True,
        num_kv_blocks=96,
        block_size=4,
        max_num_batched_tokens=2048,
        num_host_blocks=0,
        num_threads=1,
        pin_threads=False,
    )
    base.update(options)
    return EngineConfig(**base)


def assert_clean(*cores: EngineCore) -> None:
    """Every block of every engine free, no request and no connector state left on either side."""
    for core in cores:
        assert not core.scheduler.requests
        assert not core.cache.owners(), core.cache.owners()
        assert core.cache.usage() == 0.0
        core.cache.check_consistency()
        assert core.scheduler.kv is not None and core.scheduler.kv.empty(), vars(core.scheduler.kv)
        assert core.kv_worker is not None and core.kv_worker.empty()
        assert not core.runner.requests


@pytest.fixture
def make_engines() -> Iterator:  # type: ignore[type-arg]
    """`make_engines(folder, n, **options)`: n engines, shut down after the test."""
    made: list[EngineCore] = []

    def make(folder: Path, n: int = 2, clock=None, **options) -> list[EngineCore]:  # type: ignore[no-untyped-def]
        cores = []
        for _ in range(n):
            config = engine_config(folder, **options)
            core = EngineCore(config) if clock is None else EngineCore(config, clock=clock)
            made.append(core)
            cores.append(core)
        return cores

    yield make
    for core in made:
        core.shutdown()
