"""A TE group behind one `RoutingCoreClient`, with two real engine processes: requests sharing a prefix land
on the TE that caches it while the group is balanced; under skewed load the combined policy spreads them."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepflow.engine.async_llm import AsyncLLM
from deepflow.engine.config import EngineConfig
from deepflow.engine.core_client import MPEngineCoreClient
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform.je.policies import Reason, make_policy
from deepflow.platform.je.routing_client import RoutingCoreClient

SYSTEM = (
    "You are the assistant of a small harbour bakery. It opens at seven, sells rye, spelt and white "
    "sourdough, croissants, cinnamon rolls and lemon tarts, bakes birthday cakes on three days' notice, "
    "and donates leftover bread to the shelter every evening. Answer briefly and only from these facts."
)


@pytest.fixture(scope="module")
def tes(smollm2_dir: Path) -> Iterator[dict[str, MPEngineCoreClient]]:
    config = EngineConfig(
        model=str(smollm2_dir),
        dtype="float32",
        max_num_seqs=4,
        kv_cache_memory=64 << 20,
        host_cache_memory=0,
        kv_events=True,
    )
    clients = {"te-0": MPEngineCoreClient(config), "te-1": MPEngineCoreClient(config)}
    yield clients
    for client in clients.values():
        client.shutdown()


def run(tes: dict[str, MPEngineCoreClient], policy_name: str, scenario, **params) -> RoutingCoreClient:
    group = RoutingCoreClient(dict(tes), make_policy(policy_name, **params), block_size=16)
    engine = AsyncLLM(EngineConfig(), client=group)

    async def main() -> None:
        await scenario(engine, group)
        await engine.reset_prefix_cache()  # the next test starts with cold caches

    try:
        asyncio.run(main())
    finally:
        engine._output_task = None  # the TEs outlive this engine; only its loop ends
    return group


async def complete(
    engine: AsyncLLM, prompt: list[int], max_tokens: int = 4, started: asyncio.Event | None = None
) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    last = None
    async for out in engine.generate(prompt, params):
        last = out
        if started is not None and out.outputs[0].token_ids:
            started.set()  # running on its TE, whose stats (in the same batch) now count it
    assert last is not None and last.finished
    return last.num_cached_tokens


def prompts(engine: AsyncLLM, count: int) -> list[list[int]]:
    return [
        engine.tokenizer.encode_chat(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: when?"}]
        )
        for i in range(count)
    ]


def test_requests_sharing_a_prefix_follow_the_te_that_caches_it(tes) -> None:
    async def scenario(engine: AsyncLLM, group: RoutingCoreClient) -> None:
        batch = prompts(engine, 5)
        assert await complete(engine, batch[0]) == 0
        for prompt in batch[1:]:
            assert await complete(engine, prompt) >= 64  # the system prompt was not recomputed

    group = run(tes, "locality", scenario)
    chosen = [d.te_id for _, d in group.decisions]
    assert len(chosen) == 5 and len(set(chosen)) == 1
    assert [d.reason for _, d in group.decisions][1:] == [Reason.PREFIX_MATCH] * 4


def test_under_skewed_load_the_combined_policy_spreads_a_shared_prefix(tes) -> None:
    async def scenario(engine: AsyncLLM, group: RoutingCoreClient) -> None:
        batch = prompts(engine, 4)
        await complete(engine, batch[0])  # warms one TE's cache
        decoding = asyncio.Event()
        busy = asyncio.create_task(complete(engine, batch[1], 150, decoding))  # a long answer on that TE
        await asyncio.wait_for(decoding.wait(), 120)  # a bound against hangs only
        assert not busy.done()  # still owing ~150 tokens when the next request is routed
        await complete(engine, batch[2])
        await busy

    group = run(tes, "combined", scenario, balance_abs_threshold=64, balance_rel_threshold=1.2)
    (_, first), (_, long), (_, third) = list(group.decisions)
    assert long.te_id == first.te_id and long.reason == Reason.PREFIX_MATCH
    assert third.te_id != first.te_id and third.reason == Reason.IMBALANCED


def test_least_load_spreads_concurrent_requests(tes) -> None:
    async def scenario(engine: AsyncLLM, group: RoutingCoreClient) -> None:
        batch = [[500 + i] * 40 for i in range(6)]
        await asyncio.gather(*(complete(engine, p, max_tokens=8) for p in batch))

    group = run(tes, "least_load", scenario)
    chosen = [d.te_id for _, d in group.decisions]
    assert chosen.count("te-0") == chosen.count("te-1") == 3


class FirstHealthy:
    """Test policy: always the first healthy TE, so the test knows where requests go."""

    name = "first_healthy"

    def select(self, request, group):  # type: ignore[no-untyped-def]
        from deepflow.platform.je.policies import Decision

        return Decision(te_id=group.healthy()[0].te_id, reason=Reason.LEAST_LOAD)


def test_a_dead_te_loses_no_request_that_had_not_streamed(smollm2_dir: Path) -> None:
    config = EngineConfig(
        model=str(smollm2_dir), dtype="float32", max_num_seqs=4, kv_cache_memory=64 << 20, host_cache_memory=0
    )
    clients = {"te-0": MPEngineCoreClient(config), "te-1": MPEngineCoreClient(config)}
    group = RoutingCoreClient(dict(clients), FirstHealthy(), block_size=16)
    engine = AsyncLLM(EngineConfig(), client=group)
    victim_pid = clients["te-0"].pid
    assert victim_pid is not None

    async def collect(prompt: list[int], max_tokens: int, started: asyncio.Event | None = None):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        last = None
        async for out in engine.generate(prompt, params):
            last = out
            if started is not None and out.outputs[0].token_ids:
                started.set()
        return last

    async def scenario():
        streaming = asyncio.Event()
        streamed = asyncio.create_task(collect([400 + i for i in range(20)], 400, streaming))
        await asyncio.wait_for(streaming.wait(), 60)
        fresh = asyncio.create_task(collect([700 + i % 50 for i in range(800)], 6))
        while not any(d.te_id == "te-0" for rid, d in list(group.decisions)[1:]):
            await asyncio.sleep(0.001)
        os.kill(victim_pid, signal.SIGKILL)  # te-0 dies: mid-stream for one, before any token for the other
        results = await streamed, await fresh, await collect([900 + i for i in range(10)], 4)
        assert group.is_alive() and not group.tes["te-0"].load().healthy
        return results

    try:
        streamed, fresh, after = asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        engine.shutdown()
    assert streamed.outputs[0].finish_reason == "abort" and "te-0" in str(streamed.outputs[0].stop_reason)
    assert fresh.outputs[0].finish_reason == "length" and len(fresh.outputs[0].token_ids) == 6
    assert after.outputs[0].finish_reason == "length"
    assert [d.te_id for _, d in group.decisions] == ["te-0", "te-0", "te-1", "te-1"]  # fresh was retried
