"""The offline and async Python APIs on the embedded SmolLM2: every sampling option does what it says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deepflow import LLM, AsyncLLM, EngineConfig, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path):
    engine = LLM(str(smollm2_dir), dtype="float32", max_num_seqs=32)
    yield engine
    engine.shutdown()


def assert_idle(engine: LLM) -> None:
    core = engine.core
    assert not core.has_work()
    core.cache.check_consistency()
    assert not core.cache.owners() and core.cache.usage() == 0.0
    assert not core.runner.requests and not core.runner._parked


def test_chat_answers_coherently(llm: LLM) -> None:
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.eos_token_ids
    assert_idle(llm)


def test_max_tokens_and_length_finish(llm: LLM) -> None:
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_stop_string_truncates_and_never_leaks(llm: LLM) -> None:
    base = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text
    assert "Paris" in base
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris"]))[0].outputs[0]
    assert out.text == base[: base.index("Paris")]
    assert out.finish_reason == "stop" and out.stop_reason == "Paris"
    kept = llm.chat(
        QUESTION,
        SamplingParams(temperature=0.0, max_tokens=24, stop=["Paris"], include_stop_str_in_output=True),
    )[0].outputs[0]
    assert kept.text == base[: base.index("Paris") + len("Paris")]
    assert_idle(llm)


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    greedy = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].token_ids
    stop_id = greedy[2]
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].token_ids == greedy[:3] and out.outputs[0].stop_reason == stop_id
    # min_tokens masks EOS until reached: the answer goes on past the point where it would end.
    longer = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=40, min_tokens=len(greedy) + 3))[0]
    assert len(longer.outputs[0].token_ids) >= len(greedy) + 3


def test_logprobs_are_consistent(llm: LLM) -> None:
    out = llm.generate(
        "The sky is", SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)
    )
    seq = out[0].outputs[0]
    assert seq.logprobs is not None and len(seq.logprobs) == len(seq.token_ids) == 6
    for token_id, lp in zip(seq.token_ids, seq.logprobs, strict=False):
        assert lp.token_id == token_id and lp.rank == 1  # greedy picks the most likely token
        assert lp.top_ids[0] == token_id and len(lp.top_ids) == 3
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True) and lp.logprob <= 0


def test_seeded_sampling_is_reproducible_in_mixed_batches(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate("Write a word:", seeded)[0].outputs[0].token_ids
    others = [
        SamplingParams(temperature=0.9, max_tokens=10),
        SamplingParams(temperature=0.0, max_tokens=20),
        SamplingParams(temperature=0.7, max_tokens=8, seed=7),
    ]
    prompts = ["Hello there", "Write a word:", "List three colors", "Why?"]
    batch = llm.generate(prompts, [others[0], seeded, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone


def test_n_samples_are_distinct_and_reproducible(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5, ignore_eos=True)
    first = llm.generate("My favourite animal is", params)[0]
    again = llm.generate("My favourite animal is", params)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
    assert_idle(llm)


def test_async_streaming_matches_offline_and_abort_frees_blocks(smollm2_dir: Path, llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = llm.generate("The history of Rome", params)[0].outputs[0]

    async def scenario() -> None:
        engine = AsyncLLM(EngineConfig(model=str(smollm2_dir), dtype="float32"), in_process=True)
        core = engine.client.core  # type: ignore[attr-defined]
        try:
            text, deltas = "", 0
            async for out in engine.generate("The history of Rome", params):
                text += out.outputs[0].delta_text
                deltas += 1
            assert text == expected.text and out.outputs[0].token_ids == expected.token_ids
            assert deltas > 1

            # A consumer that walks away mid-stream aborts its request; the blocks come back.
            stream = engine.generate("Tell me a long story", SamplingParams(max_tokens=200, ignore_eos=True))
            async for _ in stream:
                break
            await stream.aclose()
            # Explicit abort ends the stream with finish_reason "abort".
            reasons = []
            async for out in engine.generate(
                "Another long story", SamplingParams(max_tokens=200, ignore_eos=True), request_id="victim"
            ):
                if not reasons:
                    await engine.abort("victim")
                reasons.append(out.outputs[0].finish_reason)
            assert reasons[-1] == "abort"
            for _ in range(1500):  # a bound against a hang only: the abort is processed within a step
                if not core.cache.owners() and not core.has_work():
                    break
                await asyncio.sleep(0.02)
            assert not core.cache.owners() and core.cache.usage() == 0.0
            assert not core.scheduler.requests
        finally:
            engine.shutdown()

    asyncio.run(scenario())
