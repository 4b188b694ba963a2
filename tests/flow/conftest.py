from __future__ import annotations

import pytest

from deepflow.flow import LayoutDescriptor


@pytest.fixture(scope="session")
def layout() -> LayoutDescriptor:
    """Immutable, so one for the session (hypothesis tests take it too)."""
    return LayoutDescriptor(
        model_id="smollm2-135m", dtype="bfloat16", num_layers=2, num_kv_heads=3, head_dim=8, block_size=4
    )
