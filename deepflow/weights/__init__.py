"""Model weights on disk: where they live and how they get there (the embedded model comes from a GGUF)."""

from deepflow.weights.embedded import (
    EMBEDDED_MODEL_NAME,
    convert_gguf,
    default_home,
    embedded_model_dir,
    find_embedded_gguf,
    prepare_embedded_model,
)

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "convert_gguf",
    "default_home",
    "embedded_model_dir",
    "find_embedded_gguf",
    "prepare_embedded_model",
]
