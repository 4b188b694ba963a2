"""DeepFlow: a serverless platform for serving large language models (FlowServe engine inside)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from deepflow.engine.async_llm import AsyncLLM
    from deepflow.engine.config import EngineConfig
    from deepflow.engine.llm import LLM
    from deepflow.engine.sampling_params import SamplingParams

# Imported lazily: the pure modules (scheduler, policies) must be importable without torch.
_EXPORTS = {
    "LLM": "deepflow.engine.llm",
    "AsyncLLM": "deepflow.engine.async_llm",
    "EngineConfig": "deepflow.engine.config",
    "SamplingParams": "deepflow.engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deepflow' has no attribute {name!r}")
