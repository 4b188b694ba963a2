"""Greedy fp32 output through one prefill and one decode engine equals colocated serving, and so HF, token
for token: by request and by layer, with and without prefix hits on either side, with chunked prefill.

Two EngineCores in this process, each with its KV pool in shared memory and its DistFlow agent, driven per
the PD contract by `pd.PDDriver` (what the JE does). The references are HF's `generate` (tiny random-weight
models of each architecture, and SmolLM2)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from deepflow.engine.kv_transfer import KVMode
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from tests.engine.kv_connector.conftest import assert_clean
from tests.engine.kv_connector.pd import PDDriver
from tests.engine.test_hf_equivalence import hf_greedy

pytestmark = pytest.mark.slow  # engines on real models: `make test-fast` leaves this module out


MAX_NEW = 8
HITS = ["none", "prefill", "decode", "both"]  # which side already holds the prompts' shared prefix
SETUPS = {
    "batched": dict(max_num_batched_tokens=2048),
    "chunked": dict(max_num_batched_tokens=16),  # chunks smaller than the prompts
    "chunked-sync": dict(max_num_batched_tokens=16, async_scheduling=False),
}


def warm(core, request_id: str, prompt: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Serve `prompt` colocated on one engine, so that its prefix cache holds it."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    core.add_request(
        EngineCoreRequest(request_id=request_id, prompt_token_ids=prompt, sampling_params=params)
    )
    for _ in range(10_000):
        if not core.has_work():
            return
        core.step()
    raise AssertionError("warm-up did not finish")


def prompts_for(vocab: int, seed: int, prefix_len: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    prompts += [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))] for _ in range(4)]
    return prefix, prompts


def run_pd(
    prefill, decode, mode: KVMode, prompts: list[list[int]], hit: str, prefix: list[int], max_new: int
):  # type: ignore[no-untyped-def]
    if hit in ("prefill", "both"):
        warm(prefill, "warm-p", [*prefix, 7])
    if hit in ("decode", "both"):
        warm(decode, "warm-d", [*prefix, 7])
    driver = PDDriver(prefill, decode, mode)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        driver.submit(f"r{i}", prompt, params)
    driver.run()
    for i in range(len(prompts)):
        req = driver.requests[f"r{i}"]
        assert req.p_final is not None and req.p_final.kv_transferred, req.p_final
        assert req.d_final is not None and req.d_final.error_type is None, req.d_final
        sink = req.d_outputs[0].kv_sink
        assert sink is not None
        if i < 4 and hit in ("decode", "both"):
            assert sink.num_local_tokens > 0, "the decode side should have sent only what it lacks"
        if i < 4 and hit in ("prefill", "both"):
            assert req.p_final.num_cached_tokens > 0, "the prefill side should have hit its cache"
    assert_clean(prefill, decode)
    return [driver.requests[f"r{i}"].tokens for i in range(len(prompts))]


CASES = [("chunked", hit) for hit in HITS] + [("batched", "both"), ("chunked-sync", "both")]


@pytest.mark.parametrize(("setup", "hit"), CASES)
@pytest.mark.parametrize("mode", list(KVMode))
def test_tiny_models_pd_match_hf(
    tiny_model_dir: Path, make_engines, mode: KVMode, setup: str, hit: str
) -> None:  # type: ignore[no-untyped-def]
    prefix, prompts = prompts_for(512, seed=len(setup) + len(hit), prefix_len=14)
    expected = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    prefill, decode = make_engines(tiny_model_dir, 2, **SETUPS[setup])
    assert run_pd(prefill, decode, mode, prompts, hit, prefix, MAX_NEW) == expected


@pytest.mark.parametrize("mode", list(KVMode))
def test_tcp_backend_pd_matches_hf(tiny_model_dir: Path, make_engines, mode: KVMode) -> None:  # type: ignore[no-untyped-def]
    """Across hosts the bytes go over DistFlow's TCP path (here forced on one host): same output."""
    prefix, prompts = prompts_for(512, seed=4, prefix_len=10)
    expected = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    prefill, decode = make_engines(tiny_model_dir, 2, kv_backend="tcp", max_num_batched_tokens=16)
    assert run_pd(prefill, decode, mode, prompts, "both", prefix, MAX_NEW) == expected
    peer = prefill.kv_worker._peers[decode.kv_sink_address]  # type: ignore[union-attr]
    assert peer.backend.value == "tcp"


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("mode", list(KVMode))
def test_each_backend_pd(tiny_model_dir: Path, make_engines, mode: KVMode, backend: str) -> None:  # type: ignore[no-untyped-def]
    """Both attention backends (the by-layer hook runs on each), bf16 left to the fused path below."""
    from deepflow.engine import kernels
    from deepflow.engine.attention import KERNEL_OPS

    if backend == "kernels" and not kernels.available(*KERNEL_OPS):
        pytest.skip("kernels unavailable")
    prefix, prompts = prompts_for(512, seed=3, prefix_len=10)
    expected = hf_greedy(tiny_model_dir, prompts, MAX_NEW)
    prefill, decode = make_engines(tiny_model_dir, 2, backend=backend, max_num_batched_tokens=16)
    assert run_pd(prefill, decode, mode, prompts, "both", prefix, MAX_NEW) == expected


@pytest.mark.parametrize("mode", list(KVMode))
def test_bf16_fused_layer_path_pd_matches_colocated(smollm2_dir: Path, make_engines, mode: KVMode) -> None:  # type: ignore[no-untyped-def]
    """bf16 on the kernels runs decode-sized steps as fused `deepflow::decoder_layer` calls, which call the
    by-layer hook too: PD output equals the same engine colocated (bf16 is not compared with HF)."""
    from deepflow.engine.core import EngineCore
    from deepflow.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_dir)
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": t}]) for t in ("Hi.", "Tell me about rain.")
    ]
    options = dict(dtype="bfloat16", max_num_batched_tokens=8, block_size=16, num_kv_blocks=64)
    prefill, decode, colocated = make_engines(smollm2_dir, 3, **options)
    from deepflow.engine import kernels

    if kernels.available("decoder_layer"):
        assert prefill.runner.model._layer_weights is not None, "the fused layer path should be in use"
    hooked = []  # fused-path calls that carried the by-layer hook
    model = prefill.runner.model
    fused = model._layer_calls

    def counting(x, kv_caches, meta, call, after_layer=None):  # type: ignore[no-untyped-def]
        if after_layer is not None:
            hooked.append(1)
        return fused(x, kv_caches, meta, call, after_layer)

    model._layer_calls = counting
    assert isinstance(colocated, EngineCore)
    ref = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        colocated.add_request(
            EngineCoreRequest(request_id=f"c{i}", prompt_token_ids=prompt, sampling_params=params)
        )
    tokens: dict[str, list[int]] = {}
    while colocated.has_work():
        for out in colocated.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    ref = [tokens[f"c{i}"] for i in range(len(prompts))]
    assert run_pd(prefill, decode, mode, prompts, "none", [], MAX_NEW) == ref
    if mode is KVMode.BY_LAYER and kernels.available("decoder_layer"):
        assert hooked, "by-layer sends should have run from the fused decoder_layer path"


@pytest.mark.parametrize("mode", list(KVMode))
def test_smollm2_pd_matches_hf(smollm2_dir: Path, make_engines, mode: KVMode) -> None:  # type: ignore[no-untyped-def]
    from deepflow.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_dir)
    system = "You are a helpful assistant who answers in one short paragraph."
    texts = ["Tell me about the moon.", "What is bread made of?", "Name a chess opening."]
    prompts = [
        tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": t}])
        for t in texts
    ]
    prefix = prompts[0][: len(prompts[0]) - 8]
    expected = hf_greedy(smollm2_dir, prompts, MAX_NEW)
    prefill, decode = make_engines(smollm2_dir, 2, block_size=8, num_kv_blocks=128, max_num_batched_tokens=24)
    got = run_pd(prefill, decode, mode, prompts, "none", prefix, MAX_NEW)
    assert got == expected
    # Again: now both sides hold the prompts (and a shared system prompt); the decode side sends only what it
    # lacks, the prefill side computes only what it lacks, the output is the same.
    assert run_pd(prefill, decode, mode, prompts, "both", prefix, MAX_NEW) == expected
