"""`deepflow::decoder_layer` (one C++ call per layer, decode-sized steps) is the Python path, bit for bit.

Both paths run the same kernels in the same order on the same tensors, so greedy tokens and their logprobs
must be identical, not close: generated with the one-call path on, then off, in one engine (prefix caching
off, or the second run's prefills would start from the first run's cached blocks and differ for that reason).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from deepflow.engine import kernels
from deepflow.engine.llm import LLM
from deepflow.engine.sampling_params import SamplingParams
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.skipif(
    not kernels.available("decoder_layer", "small_linear"), reason="deepflow kernels unavailable"
)


@pytest.mark.parametrize("config", ["llama3-rope-gqa3", "qwen2-bias-gqa3"])
def test_layer_calls_match_the_python_layers(config: str, tmp_path: Path) -> None:
    llm = LLM(
        str(make_tiny_model(config, tmp_path)),
        dtype="bfloat16",
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
    )
    model = llm.core.runner.model
    weights = model._layer_weights
    assert weights is not None, "bf16 with the kernels turns the one-call path on"
    rng = random.Random(0)
    # Up to 40 sequences: decode steps of 1..40 rows (all small_linear), beside mixed and prefill steps.
    prompts = [
        {"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randrange(1, 60))]} for _ in range(40)
    ]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    results = {}
    for mode in ("layer", "python"):
        model._layer_weights = weights if mode == "layer" else None
        outs = llm.generate(prompts, params)
        results[mode] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    assert results["layer"] == results["python"]
