"""`deepflow sim calibrate`: measure the real engine's step times over a grid of batch shapes and fit the
simulator's cost model (`costmodel.fit_profile`).

The real `EngineCore` (embedded SmolLM2 by default, bf16, synchronous scheduling so every step is timed
alone) runs small workloads that produce: prefill chunks of several sizes, with and without a cached
context before them; decode batches of several sizes at several context lengths; and decodes mixed with a
prefill chunk. Each step's shape is taken from the `SchedulerOutput` and the runner's state just before it
runs, its time from the runner's own measurement. The first pass over the grid warms up (one oneDNN
primitive per new shape) and is not fitted. KV block copies are timed apart with the runner's own copy.

This module imports torch (through the engine); the simulator never imports it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from deepflow.engine.config import EngineConfig
from deepflow.engine.request import EngineCoreRequest, SchedulerOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.sim.costmodel import HardwareProfile, ModelShape, StepShape, fit_profile

__all__ = ["calibrate", "default_profile_path"]


def default_profile_path(model_path: Path, dtype: str = "bfloat16") -> Path:
    """Where a calibration is stored and looked for: next to the model, in its folder (the embedded model's
    folder is under $DEEPFLOW_HOME, default ~/.cache/deepflow)."""
    return Path(model_path) / f"deepflow-sim-profile-{dtype}.json"


def _grid(quick: bool) -> list[tuple[str, list[int], list[int], int]]:
    """(label, prompt lengths, cached-context lengths, max_tokens) of each workload of the grid. Decode
    batches stay within the default KV pool (1 GiB: ~46k tokens of SmolLM2), so nothing is preempted."""
    prefills = [16, 64, 256, 512, 1024, 2048] if not quick else [64, 512]
    contexts = [512, 1536] if not quick else [512]
    decodes = (
        [(1, 64), (1, 1024), (4, 2048), (8, 64), (8, 1024), (16, 64), (32, 256), (64, 64), (96, 32)]
        if not quick
        else [(1, 64), (8, 256), (32, 64)]
    )
    grid: list[tuple[str, list[int], list[int], int]] = []
    for p in prefills:
        grid.append((f"prefill {p}", [p], [0], 1))
    for c in contexts:
        for p in (64, 512):
            grid.append((f"prefill {p} after {c} cached", [p], [c], 1))
    for b, n in decodes:
        grid.append((f"decode x{b} at {n}", [n] * b, [0] * b, 12))
    grid.append(("mixed", [1024, *([256] * 16)], [0] * 17, 4))
    return grid


class _Recorder:
    """Wraps the runner's `execute`: each step's shape before it runs, its measured time after."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.inner: Callable[[SchedulerOutput], Any] = runner.execute
        self.samples: list[tuple[StepShape, float]] = []
        self.recording = False

    def __call__(self, out: SchedulerOutput) -> Any:
        starts = {new.request_id: new.num_computed_tokens for new in out.new_requests}
        shape = StepShape()
        for request_id, num_new in out.num_scheduled_tokens.items():
            start = starts.get(request_id)
            if start is None:
                start = self.runner.requests[request_id].num_computed_tokens
            shape.add(start, num_new)
        result = self.inner(out)
        if self.recording and out.total_num_scheduled_tokens and not out.kv_transfers:
            self.samples.append((shape, result.step_seconds))
        return result


def _run(core: Any, requests: list[EngineCoreRequest]) -> None:
    for request in requests:
        core.add_request(request)
    while core.has_work():
        core.step()


def calibrate(
    config: EngineConfig | None = None,
    *,
    quick: bool = False,
    repeats: int = 1,
    log: Callable[[str], None] = print,
) -> HardwareProfile:
    """Run the grid on a real engine and return the fitted profile (not saved)."""
    from deepflow.cache.rtc import BlockTransfer
    from deepflow.engine.core import EngineCore

    config = replace(config or EngineConfig(), async_scheduling=False, kv_events=False)
    core = EngineCore(config)
    model = ModelShape.from_folder(core.model_path, config.dtype)
    model = replace(model, max_position_embeddings=core.runner.model.args.max_position_embeddings)
    recorder = _Recorder(core.runner)
    core.runner.execute = recorder
    rng_state = [12345]

    def fresh(n: int) -> list[int]:  # distinct prompts: no accidental cache hits
        ids = []
        for _ in range(n):
            rng_state[0] = (rng_state[0] * 1103515245 + 12345) % (1 << 31)
            ids.append(1000 + rng_state[0] % 40000)
        return ids

    counter = [0]

    def request(prompt: list[int], max_tokens: int) -> EngineCoreRequest:
        counter[0] += 1
        return EngineCoreRequest(
            request_id=f"cal-{counter[0]}",
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        )

    grid = _grid(quick)
    started = time.perf_counter()
    try:
        # Warm-up, not fitted: the first steps of a process pay one-time costs (allocations, primitives).
        _run(core, [request(fresh(n), 4) for n in (512, 64, 64, 64)])
        core.reset_prefix_cache()
        for rep in range(repeats):
            recorder.recording = True
            for _label, prompts, cached, max_tokens in grid:
                prefixes = [fresh(c) for c in cached]
                warm = [request(p, 1) for p in prefixes if p]
                if warm:
                    _run(core, warm)  # the context is now cached
                _run(
                    core,
                    [request(pre + fresh(n), max_tokens) for pre, n in zip(prefixes, prompts, strict=True)],
                )
                core.reset_prefix_cache()
            elapsed = time.perf_counter() - started
            log(f"pass {rep + 1}/{repeats}: {len(recorder.samples)} steps, {elapsed:.0f} s")
        # KV block copies: the runner's own copy, device pool to device pool, 64 blocks at a time.
        runner = core.runner
        count = min(64, runner.num_blocks // 2)
        copies = []
        for _ in range(5):
            t0 = time.perf_counter()
            runner._transfer(BlockTransfer("d2d", list(range(count)), list(range(count, 2 * count))))
            copies.append((time.perf_counter() - t0) / count)
        copy_per_block = sorted(copies)[len(copies) // 2]
    finally:
        core.shutdown()
    shapes = [s for s, _ in recorder.samples]
    seconds = [t for _, t in recorder.samples]
    profile = fit_profile(
        shapes,
        seconds,
        description=f"fitted by deepflow sim calibrate on {platform.node()} ({os.cpu_count()} CPUs)",
        model=model,
        copy_seconds_per_block=copy_per_block,
        fit={
            "engine": {k: v for k, v in asdict(config).items() if k in _ENGINE_FIELDS},
            "grid": [label for label, *_ in grid],
            "repeats": repeats,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
            "calibration_seconds": round(time.perf_counter() - started, 1),
        },
    )
    return profile


_ENGINE_FIELDS = (
    "model",
    "dtype",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "num_threads",
    "backend",
    "device",
)
