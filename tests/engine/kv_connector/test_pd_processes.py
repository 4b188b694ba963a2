"""1P+1D as two engine processes (MPEngineCoreClient, the TE's core loop): commands and outputs over ZeroMQ,
the KV between the processes' shared-memory pools over DistFlow. The JE's part is played here, per the
contract: KVConsume to D, its sink into KVProduce to P, P's first token as KVPrefilled to D."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deepflow.engine.core_client import MPEngineCoreClient
from deepflow.engine.kv_transfer import KVConsume, KVMode, KVPrefilled, KVProduce
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from tests.engine.kv_connector.conftest import engine_config
from tests.engine.test_hf_equivalence import hf_greedy, random_prompts

pytestmark = pytest.mark.slow  # engines on real models: `make test-fast` leaves this module out


MAX_NEW = 8
OUTPUT_TIMEOUT_S = 60.0  # a hang guard per output batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from tests.conftest import make_tiny_model

    return make_tiny_model("mistral-gqa2", tmp_path_factory.mktemp("pd-procs"))


async def serve_pd(prefill, decode, prompts: list[list[int]], mode: KVMode) -> tuple[list[list[int]], list]:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    finals: dict[str, dict[str, object]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"{mode}-{i}"
        tokens[rid] = []
        finals[rid] = {}
        decode.add_request(
            EngineCoreRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling_params=params,
                kv_transfer=KVConsume(mode=mode),
            )
        )

    async def pump(client, side: str) -> None:  # type: ignore[no-untyped-def]
        while not all(side in f for f in finals.values()):
            batch = await asyncio.wait_for(client.get_outputs(), OUTPUT_TIMEOUT_S)
            for out in batch.outputs:
                rid = out.request_id
                if side == "d" and out.kv_sink is not None:
                    index = int(rid.rsplit("-", 1)[1])
                    produce = KVProduce(sink=out.kv_sink, mode=mode)
                    prefill.add_request(
                        EngineCoreRequest(
                            request_id=rid,
                            prompt_token_ids=prompts[index],
                            sampling_params=params,
                            kv_transfer=produce,
                        )
                    )
                    continue
                if side == "p" and out.new_token_ids:
                    assert out.finish_reason is None  # streamed before the prefill side finishes
                    tokens[rid][:0] = out.new_token_ids
                    decode.send(KVPrefilled(request_id=rid, first_token_id=out.new_token_ids[0]))
                elif side == "d":
                    tokens[rid].extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finals[rid][side] = out

    await asyncio.gather(pump(prefill, "p"), pump(decode, "d"))
    order = sorted(tokens, key=lambda r: int(r.rsplit("-", 1)[1]))
    return [tokens[r] for r in order], [finals[r] for r in order]


def test_two_processes_pd_match_hf(folder: Path) -> None:
    prompts = random_prompts(6, 512, seed=5, min_len=3, max_len=30)
    expected = hf_greedy(folder, prompts, MAX_NEW)
    config = engine_config(folder, max_num_batched_tokens=8)
    prefill = MPEngineCoreClient(config)
    decode = MPEngineCoreClient(config)
    try:
        for mode in KVMode:
            got, finals = asyncio.run(serve_pd(prefill, decode, prompts, mode))
            assert got == expected, mode
            for f in finals:
                assert f["p"].kv_transferred and f["p"].finish_reason == "stop"  # type: ignore[attr-defined]
                assert f["d"].error_type is None and f["d"].finish_reason == "length"  # type: ignore[attr-defined]
    finally:
        prefill.shutdown()
        decode.shutdown()
