"""Greedy fp32 output must equal HF transformers `generate` token for token, however the engine batches.

Each model is checked under: one request alone; 32 mixed-length requests in one batch; chunked prefill with a
chunk smaller than the prompts; forced preemption (a KV pool too small for all); async scheduling on and off.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

import pytest
import torch

from deepflow import LLM, SamplingParams

MAX_NEW = 12

ENGINE_SETUPS = {
    "batched": dict(max_num_seqs=64, max_num_batched_tokens=4096),
    "chunked": dict(max_num_seqs=64, max_num_batched_tokens=16),
    "preempt": dict(max_num_seqs=64, max_num_batched_tokens=4096, num_kv_blocks=24, block_size=4),
}


@cache
def _hf_model(folder: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(folder: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    model = _hf_model(str(folder))
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            seq = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=max_new,
                min_new_tokens=0,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
            outputs.append(seq[0, len(ids) :].tolist())
    return outputs


def random_prompts(count: int, vocab: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def run_engine(folder: Path, prompts: list[list[int]], max_new: int, **options) -> list[list[int]]:
    llm = LLM(str(folder), dtype="float32", skip_tokenizer_init=True, **options)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert not llm.core.scheduler.requests and not llm.core.runner.requests
        llm.core.cache.check_consistency()
        assert not llm.core.cache.owners() and llm.core.cache.usage() == 0.0
        if options.get("num_kv_blocks"):
            assert llm.core.scheduler.num_preemptions_total > 0, "the setup was meant to force preemption"
        return [o.outputs[0].token_ids for o in outputs]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_tiny_models_match_hf(tiny_model_dir: Path, setup: str, async_scheduling: bool) -> None:
    prompts = random_prompts(32, 512, seed=len(setup))
    expected = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    got = run_engine(
        tiny_model_dir, prompts, MAX_NEW, async_scheduling=async_scheduling, **ENGINE_SETUPS[setup]
    )
    assert got == expected


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_tiny_models_single_request_match_hf(tiny_model_dir: Path, async_scheduling: bool) -> None:
    prompts = random_prompts(1, 512, seed=7, min_len=20, max_len=20)
    expected = hf_greedy(tiny_model_dir, prompts, 24)
    assert run_engine(tiny_model_dir, prompts, 24, async_scheduling=async_scheduling) == expected


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_each_backend_matches_hf(tiny_model_dir: Path, setup: str, backend: str) -> None:
    """The default (auto) runs the kernels where they are built; both paths are checked on every machine that
    has them, and the torch path everywhere (a CPU without AVX512-BF16 or DEEPFLOW_KERNELS=0 runs it)."""
    from deepflow.engine import kernels
    from deepflow.engine.attention import KERNEL_OPS

    if backend == "kernels" and not kernels.available(*KERNEL_OPS):
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason() or 'ops missing'}")
    prompts = random_prompts(16, 512, seed=11 + len(setup))
    expected = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    assert run_engine(tiny_model_dir, prompts, MAX_NEW, backend=backend, **ENGINE_SETUPS[setup]) == expected


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_dir: Path) -> list[list[int]]:
    from deepflow.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_dir)
    topics = [
        "the moon",
        "Python decorators",
        "bread",
        "the French revolution",
        "rain",
        "chess openings",
        "photosynthesis",
        "a haiku about cats",
    ]
    prompts = []
    for i in range(32):
        text = f"Tell me {'briefly ' * (i % 4)}about {topics[i % len(topics)]}." + " Please." * (i % 7)
        prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
    return prompts


@pytest.fixture(scope="module")
def smollm2_expected(smollm2_dir: Path, smollm2_prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy(smollm2_dir, smollm2_prompts, MAX_NEW)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("setup", ["single", *ENGINE_SETUPS])
def test_smollm2_matches_hf(
    smollm2_dir: Path,
    smollm2_prompts: list[list[int]],
    smollm2_expected: list[list[int]],
    setup: str,
    async_scheduling: bool,
) -> None:
    if setup == "single":
        got = run_engine(smollm2_dir, smollm2_prompts[:1], MAX_NEW, async_scheduling=async_scheduling)
        assert got == smollm2_expected[:1]
        return
    options = dict(ENGINE_SETUPS[setup])
    if setup == "preempt":
        options.update(num_kv_blocks=80, block_size=8)
    got = run_engine(smollm2_dir, smollm2_prompts, MAX_NEW, async_scheduling=async_scheduling, **options)
    assert got == smollm2_expected
