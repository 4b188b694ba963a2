"""benchmarks/roofline.py's pure functions: bytes and FLOPs of a decode step, the floor (nothing timed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from benchmarks.roofline import (
    decode_floor_seconds,
    model_decode_bytes,
    model_decode_flops,
    model_weight_elements,
)
from deepflow.engine.models.llama import LlamaModel, ModelArgs

# hidden 4, intermediate 6, 2 layers, 2 heads of dim 2 sharing 1 KV head, vocab 10.
TINY = ModelArgs(
    vocab_size=10,
    hidden_size=4,
    intermediate_size=6,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=2,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    qkv_bias=False,
)

# By hand, per layer: q/k/v 4 x (4 + 2 + 2) = 32, o 4 x 4 = 16, gate/up 4 x 2*6 = 48, down 6 x 4 = 24 -> 120;
# two layers 240, LM head 10 x 4 = 40: 280 elements. KV per token: 2 x 2 layers x 1 head x 2 = 8 elements.
TINY_WEIGHT_ELEMENTS = 280
TINY_KV_ELEMENTS_PER_TOKEN = 8


def test_tiny_bytes_by_hand() -> None:
    assert model_weight_elements(TINY) == TINY_WEIGHT_ELEMENTS
    weight_bytes, kv_bytes = model_decode_bytes(TINY, torch.bfloat16, [3, 5], block_size=4)
    assert weight_bytes == 560  # 280 x 2 B
    assert kv_bytes == 128  # 8 elements x (3 + 5) tokens x 2 B
    weight_bytes, kv_bytes = model_decode_bytes(TINY, torch.float32, [3, 5], block_size=4)
    assert (weight_bytes, kv_bytes) == (1120, 256)
    # A paged cache holds whole blocks: 3 -> 4 and 5 -> 8 tokens, 8 x 12 x 2 B.
    assert model_decode_bytes(TINY, torch.bfloat16, [3, 5], 4, round_to_blocks=True) == (560, 192)
    assert model_decode_bytes(TINY, torch.bfloat16, [], 4) == (560, 0)


def test_lm_head_counts_once_tied_or_not_and_embeddings_never() -> None:
    untied = dataclasses.replace(TINY, tie_word_embeddings=False)
    assert model_decode_bytes(untied, torch.bfloat16, [7], 16) == model_decode_bytes(
        TINY, torch.bfloat16, [7], 16
    )
    # A bigger vocabulary adds exactly one vocab x hidden matrix (the head), not two (head + embeddings).
    bigger = dataclasses.replace(TINY, vocab_size=20)
    assert model_weight_elements(bigger) - model_weight_elements(TINY) == 10 * 4


def test_qkv_bias_counted_in_bytes_not_in_flops() -> None:
    biased = dataclasses.replace(TINY, qkv_bias=True)
    # + (4 + 2 + 2) bias elements per layer, 2 layers.
    assert model_weight_elements(biased) == TINY_WEIGHT_ELEMENTS + 16
    assert model_decode_bytes(biased, torch.bfloat16, [1], 16)[0] == 2 * (TINY_WEIGHT_ELEMENTS + 16)
    assert model_weight_elements(biased, biases=False) == TINY_WEIGHT_ELEMENTS
    assert model_decode_flops(biased, [3, 5]) == model_decode_flops(TINY, [3, 5])


def test_flops_by_hand() -> None:
    # 2 x 280 per sequence x 2 sequences + attention 4 x 2 layers x 2 heads x 2 dims x 8 context tokens.
    assert model_decode_flops(TINY, [3, 5]) == 1120 + 256


def test_floor() -> None:
    assert decode_floor_seconds(560, 128, 688.0) == pytest.approx(1.0)
    assert decode_floor_seconds(560, 128, 688.0, flops=1376, flop_rate=688.0) == pytest.approx(2.0)
    assert decode_floor_seconds(560, 128, 688.0, flops=1376, flop_rate=1e9) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        decode_floor_seconds(1, 1, 0.0)
    with pytest.raises(ValueError):
        model_decode_bytes(TINY, torch.bfloat16, [1], block_size=0)


def test_smollm2_135m() -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    args = ModelArgs.from_hf_config(config)
    # Per layer 576 x 960 + 576 x 576 + 576 x 3072 + 1536 x 576 = 3,538,944; x 30 + 49,152 x 576 (head).
    weight_bytes, kv_bytes = model_decode_bytes(args, torch.bfloat16, [256], 16)
    assert weight_bytes == 2 * (30 * 3_538_944 + 28_311_552) == 268_959_744
    assert kv_bytes == 2 * 30 * 3 * 64 * 256 * 2 == 5_898_240


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matches_the_model_modules(qkv_bias: bool) -> None:
    """The count equals the nn.Linear parameters deepflow's LlamaModel builds (on the meta device)."""
    args = dataclasses.replace(TINY, qkv_bias=qkv_bias)
    with torch.device("meta"):
        model = LlamaModel(args, torch.bfloat16)
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    assert model_weight_elements(args) == linear
