from __future__ import annotations

import pytest

from deepflow.flow import LayoutDescriptor


@pytest.fixture
def layout() -> LayoutDescriptor:
    return LayoutDescriptor(
        model_id="smollm2-135m", dtype="bfloat16", num_layers=2, num_kv_heads=3, head_dim=8, block_size=4
    )
