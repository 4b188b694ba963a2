"""The engine core in its own process (ZeroMQ + msgspec): same outputs as in-process, and a crash of the
engine process fails its requests cleanly instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from deepflow import AsyncLLM, EngineConfig, SamplingParams
from deepflow.engine.core_client import EngineDeadError, MPEngineCoreClient


async def _collect(engine: AsyncLLM, prompt: str, params: SamplingParams) -> tuple[str, list[int]]:
    final = None
    async for out in engine.generate(prompt, params):
        final = out
    assert final is not None and final.finished
    return final.outputs[0].text, final.outputs[0].token_ids


def test_process_core_matches_in_process_and_reports_metrics(smollm2_dir: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    config = EngineConfig(model=str(smollm2_dir), dtype="float32", max_num_seqs=8)

    async def run(in_process: bool) -> tuple[list[tuple[str, list[int]]], bytes]:
        engine = AsyncLLM(config, in_process=in_process)
        try:
            results = await asyncio.gather(*[_collect(engine, f"Count to {i}:", params) for i in range(4)])
            return list(results), engine.metrics.render()
        finally:
            engine.shutdown()

    remote, text = asyncio.run(run(False))
    local, _ = asyncio.run(run(True))
    assert remote == local
    metrics = text.decode()
    assert 'vllm:generation_tokens_total{model_name="SmolLM2-135M-Instruct"} 48.0' in metrics
    assert "vllm:time_to_first_token_seconds_count" in metrics
    assert 'vllm:kv_cache_usage_perc{model_name="SmolLM2-135M-Instruct"} 0.0' in metrics


def test_engine_process_crash_fails_requests_instead_of_hanging(smollm2_dir: Path) -> None:
    async def scenario() -> None:
        client = MPEngineCoreClient(EngineConfig(model=str(smollm2_dir), dtype="bfloat16"))
        engine = AsyncLLM(client=client)
        try:
            stream = engine.generate("Tell me a story", SamplingParams(max_tokens=500, ignore_eos=True))
            await anext(stream)
            assert client.pid is not None
            os.kill(client.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                async with asyncio.timeout(30):
                    async for _ in stream:
                        pass
            assert not engine.is_alive()
            with pytest.raises(EngineDeadError):
                await anext(engine.generate("again", SamplingParams(max_tokens=2)))
        finally:
            engine.shutdown()

    asyncio.run(scenario())
