"""Shared fixtures: the embedded model and tiny random-weight models of each supported architecture."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from hypothesis import settings

# `--hypothesis-profile=thorough`: the property tests with 2,000 examples each (the scheduler's progress
# property among them), for a deliberate search rather than every run.
settings.register_profile("thorough", max_examples=2000, deadline=None)

# Modules that start engines, servers or the platform on a real model: `make test-fast` leaves them out.
SLOW_MODULES = {
    "test_contexts_e2e",
    "test_core_client",
    "test_embedded",
    "test_engine_lifecycle",
    "test_finetune_smollm2",
    "test_fine_tuning_e2e",
    "test_jobs",
    "test_hf_equivalence",
    "test_llm_api",
    "test_openai_server",
    "test_platform_e2e",
    "test_prefix_caching",
    "test_ray_backend",
    "test_routing_client",
    "test_serve_e2e",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2 folder (prepared once; idempotent, so `make test`'s preparation is reused)."""
    from deepflow.weights.embedded import prepare_embedded_model

    return prepare_embedded_model(progress=False)


# name -> (HF config class name, config overrides)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    # Llama, untied embeddings, GQA ratio 1 (multi-head attention).
    "llama-untied-mha": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2 with q/k/v bias, GQA ratio 3.
    "qwen2-bias-gqa3": (
        "Qwen2Config",
        dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
    ),
    # Llama with tied embeddings, GQA ratio 3 and llama3-style rope scaling.
    "llama3-rope-gqa3": (
        "LlamaConfig",
        dict(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=50000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    # Mistral (no sliding window), GQA ratio 2.
    "mistral-gqa2": (
        "MistralConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
}


def make_tiny_model(name: str, folder: Path) -> Path:
    """Random weights with a wide init so greedy choices are far from ties (fp32 noise cannot flip them)."""
    import torch
    import transformers

    class_name, overrides = TINY_CONFIGS[name]
    config = getattr(transformers, class_name)(
        vocab_size=512,
        max_position_embeddings=512,
        initializer_range=0.15,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(zlib.crc32(name.encode()))
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
