"""Greedy fp32 output with the Relational Tensor Cache equals HF transformers token for token: hits on whole
blocks, hits ending mid-block (copy-on-write), fully cached prompts (last token recomputed), host-tier hits
after eviction (populate), explicit contexts, and preemption of requests holding cached blocks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from deepflow import LLM, SamplingParams
from deepflow.cache.cost_model import PopulateCostModel
from deepflow.engine.contexts import CreateContext
from deepflow.engine.request import EngineCoreRequest
from tests.engine.test_hf_equivalence import hf_greedy

MAX_NEW = 8
BLOCK = 4


class AlwaysPopulate(PopulateCostModel):
    """Forces the host-tier path whatever the timings (the decision itself is tested in tests/cache)."""

    def should_populate(self, num_tokens: int, num_blocks: int) -> bool:
        return True


def shared_prefix_waves(vocab: int, seed: int, families: int = 6) -> list[list[list[int]]]:
    """One wave per prefix family, then the first families again (by then evicted from a small pool).

    Prefix lengths are not multiples of the block size, repeats of whole earlier prompts are fully cached,
    and cuts at odd lengths make hits end mid-block."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(30 + 3 * f)] for f in range(families)]

    def tail(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    waves = [[p + tail(5), p[:-7] + tail(9), p[:13] + tail(2)] for p in prefixes]
    waves.append([waves[0][0], prefixes[0][:22] + tail(6), prefixes[1] + tail(3), waves[1][1][:-2]])
    return waves


def run_waves(
    folder: Path,
    waves: list[list[list[int]]],
    always_populate: bool = False,
    cascade: bool = False,
    **options,
):
    llm = LLM(str(folder), dtype="float32", skip_tokenizer_init=True, block_size=BLOCK, **options)
    if always_populate:
        llm.core.cache.cost_model = AlwaysPopulate()
    if cascade:  # decodes sharing any cached block attend to it once for the batch
        llm.core.runner.cascade_min_saved_blocks = 1
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    try:
        outputs, cached = [], []
        for wave in waves:
            for out in llm.generate([{"prompt_token_ids": p} for p in wave], params):
                outputs.append(out.outputs[0].token_ids)
                cached.append(out.num_cached_tokens)
            llm.core.cache.check_consistency()
        assert not llm.core.cache.owners() and llm.core.cache.usage() == 0.0
        assert not llm.core.runner.requests
        return outputs, cached, llm.core.cache.stats, llm.core.scheduler.num_preemptions_total
    finally:
        llm.shutdown()


SETUPS = {
    "device": dict(),
    "device-sync": dict(async_scheduling=False),
    "cascade": dict(cascade=True),
    "host": dict(num_kv_blocks=48, num_host_blocks=256, always_populate=True),
    "host-sync": dict(num_kv_blocks=48, num_host_blocks=256, always_populate=True, async_scheduling=False),
    "preempt": dict(num_kv_blocks=24, max_num_batched_tokens=4096),
    "chunked": dict(max_num_batched_tokens=8),
    "off": dict(enable_prefix_caching=False),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_cached_prefixes_give_hf_output(
    tiny_model_dir: Path, setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deepflow.engine.model_runner as model_runner

    shared_blocks: list[int] = []
    common_prefix = model_runner._common_prefix
    monkeypatch.setattr(
        model_runner,
        "_common_prefix",
        lambda tables: shared_blocks.append(common_prefix(tables)) or shared_blocks[-1],
    )
    waves = shared_prefix_waves(512, seed=3)
    if setup == "preempt":  # everything at once: requests preempt each other while sharing blocks
        waves = [[p for wave in waves for p in wave]]
    prompts = [p for wave in waves for p in wave]
    expected = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    got, cached, stats, preemptions = run_waves(tiny_model_dir, waves, **SETUPS[setup])
    assert got == expected
    if setup == "off":
        assert stats.device_hit_tokens == stats.host_hit_tokens == 0 and not any(cached)
        return
    assert stats.device_hit_tokens > 0 and any(cached)
    assert all(c < len(p) for c, p in zip(cached, prompts, strict=True)), "a prompt's last token was cached"
    if setup.startswith("device"):
        assert stats.partial_hits > 0, "no hit ended mid-block"
        # A repeat reuses all but the last token (partially in its last block) and reports whole blocks.
        assert cached[len(prompts) - 4] == (len(prompts[len(prompts) - 4]) - 1) // BLOCK * BLOCK
    if setup.startswith("host"):
        assert stats.host_hit_tokens > 0 and stats.populates > 0, "no host-tier hit"
    if setup == "preempt":
        assert preemptions > 0
    if setup == "cascade":
        assert max(shared_blocks) > 0, "no decode batch shared a cached prefix"


def test_explicit_context_gives_hf_output(tiny_model_dir: Path) -> None:
    rng = random.Random(5)
    context = [rng.randrange(3, 512) for _ in range(27)]
    prompts = [context + [rng.randrange(3, 512) for _ in range(n)] for n in (1, 6, 11)]
    expected = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    # Implicit caching off: only the pinned context can be reused.
    llm = LLM(
        str(tiny_model_dir),
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=BLOCK,
        enable_prefix_caching=False,
    )
    core = llm.core
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    try:
        core.add_request(
            EngineCoreRequest(
                request_id="make-context",
                prompt_token_ids=context,
                sampling_params=SamplingParams(temperature=0.0, max_tokens=1),
                create_context=CreateContext(context_id="ctx", ttl_seconds=3600),
            )
        )
        pinned = None
        while core.has_work():
            for out in core.step():
                if out.request_id == "make-context" and out.finish_reason is not None:
                    pinned = out.context_pinned_tokens
        assert pinned == 24  # six whole blocks of the 27 tokens
        for i, prompt in enumerate(prompts):
            core.add_request(
                EngineCoreRequest(
                    request_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params, context_id="ctx"
                )
            )
        got: dict[str, list[int]] = {}
        cached: dict[str, int] = {}
        while core.has_work():
            for out in core.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
                cached[out.request_id] = out.num_cached_tokens
        assert [got[f"r{i}"] for i in range(3)] == expected
        assert [cached[f"r{i}"] for i in range(3)] == [24, 24, 24]
        assert core.cache.usage() == pytest.approx(6 / core.cache.num_blocks)  # still pinned
        assert core.release_context("ctx")
        assert core.cache.usage() == 0.0
        core.cache.check_consistency()
    finally:
        llm.shutdown()


def test_outputs_carry_residency_events_and_outstanding_tokens(tiny_model_dir: Path) -> None:
    """What a TE reports to job executors: its cache contents as events (mirrored by a JE's prompt tree)
    and the work it still owes."""
    import msgspec

    from deepflow.engine.core_client import AddRequest, Shutdown, run_core_loop
    from deepflow.platform.je.policies import GlobalPromptTree

    llm = LLM(
        str(tiny_model_dir), dtype="float32", skip_tokenizer_init=True, block_size=BLOCK, kv_events=True
    )
    prompt = list(range(10, 23))  # 13 tokens: 3 whole blocks
    commands = [
        AddRequest(
            EngineCoreRequest(
                request_id="r",
                prompt_token_ids=prompt,
                sampling_params=SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
            )
        )
    ]
    emitted = []

    def next_command(block: bool):
        if commands:
            return commands.pop(0)
        return Shutdown() if not llm.core.has_work() else None

    try:
        run_core_loop(llm.core, next_command, emitted.append)
    finally:
        llm.shutdown()
    tree = GlobalPromptTree(BLOCK, verify_hashes=True)
    for batch in emitted:
        for event in batch.kv_events:
            tree.apply(msgspec.structs.replace(event, te_id="te-0"))
    assert tree.match("", prompt) == {"te-0": 12}
    assert emitted[0].stats.outstanding_tokens > 0
    assert emitted[-1].stats.outstanding_tokens == 0
