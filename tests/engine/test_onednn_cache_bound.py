"""An engine's native heap stays bounded however many distinct step shapes it runs.

The bf16 linears make one oneDNN primitive per input shape (a step's token count), each ~0.5 MiB, kept in two
LRU caches of 1,024 entries by default: that was a task executor's RSS growth under steady load. The engine
core caps both caches (`bound_onednn_caches`). Measured in a fresh process each (the caches are sized at the
first primitive), as glibc's count of heap bytes in use (`mallinfo2`): live allocations, not RSS, so the
figures repeat from run to run (here: 24.1 MiB capped, 357.7 MiB at the defaults, for 200 shapes).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepflow.engine.core import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_VARIABLES, bound_onednn_caches
from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
NUM_SHAPES = 200

# Runs in a child process: an engine on the tiny model in bf16, one prompt length per step (2, 3, ... tokens),
# so every step is a shape the linears have not seen; prints the heap growth over those steps.
_CHILD = """
import ctypes, json, sys
from deepflow.engine.config import EngineConfig
from deepflow.engine.core import EngineCore
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams

libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]
libc.mallinfo2.restype = MallInfo2

model, num_shapes = sys.argv[1], int(sys.argv[2])
core = EngineCore(EngineConfig(
    model=model, dtype="bfloat16", backend="torch", num_threads=1, async_scheduling=False,
    enable_prefix_caching=False, block_size=16, num_kv_blocks=64, host_cache_memory=0,
    max_num_batched_tokens=512, max_model_len=512))

def run(length, rid):
    core.add_request(EngineCoreRequest(request_id=rid, prompt_token_ids=[3 + i % 500 for i in range(length)],
                                       sampling_params=SamplingParams(max_tokens=1, temperature=0.0)))
    while core.has_work():
        core.step()

for i in range(5):  # warm-up: the first steps' one-off allocations (thread pools, buffers)
    run(1, f"warm-{i}")
before = libc.mallinfo2().uordblks
for length in range(2, 2 + num_shapes):
    run(length, f"r-{length}")
assert not core.scheduler.requests and not core.runner.requests
print(json.dumps({"growth": libc.mallinfo2().uordblks - before}))
core.shutdown()
"""


def _heap_growth(model: Path, capacity: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_VARIABLES}
    if capacity is not None:  # set beforehand: the engine keeps what the environment says
        env.update(dict.fromkeys(ONEDNN_CACHE_VARIABLES, capacity))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model), str(NUM_SHAPES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth"]


def test_bound_onednn_caches_keeps_what_the_environment_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # recorded, so teardown restores it
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    bound_onednn_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "512"


def _has_mallinfo2() -> bool:
    try:
        return sys.platform == "linux" and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc's mallinfo2 (glibc 2.33+)")
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN: the linears are not packed")
def test_engine_heap_is_bounded_over_distinct_step_shapes(tmp_path: Path) -> None:
    model = make_tiny_model("llama-untied-mha", tmp_path / "tiny")
    uncapped = _heap_growth(model, "1024")  # oneDNN's and ideep's defaults
    if uncapped < 32 * 2**20:
        pytest.skip(f"this oneDNN keeps little per shape ({uncapped / 2**20:.1f} MiB, {NUM_SHAPES} shapes)")
    capped = _heap_growth(model, None)  # the engine's own cap
    assert capped < 64 * 2**20, f"heap grew {capped / 2**20:.1f} MiB over {NUM_SHAPES} step shapes"
    assert capped < uncapped / 3, (capped, uncapped)
