"""The compute path is chosen at load: DEEPFLOW_KERNELS=0 (or a CPU without AVX512-BF16) means torch."""

from __future__ import annotations

import pytest
import torch

from deepflow.engine import kernels
from deepflow.engine.attention import select_backend
from deepflow.engine.attention.torch_backend import TorchAttention


@pytest.fixture
def kernels_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEEPFLOW_KERNELS", "0")
    kernels.load.cache_clear()
    yield
    monkeypatch.delenv("DEEPFLOW_KERNELS")
    kernels.load.cache_clear()


def test_disabled_kernels_select_the_torch_path(kernels_off: None) -> None:
    assert kernels.unavailable_reason() == "disabled by DEEPFLOW_KERNELS=0"
    assert select_backend("auto", torch.device("cpu")) is TorchAttention
    with pytest.raises(RuntimeError, match="DEEPFLOW_KERNELS=0"):
        select_backend("kernels", torch.device("cpu"))


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, kernels, torch"):
        select_backend("triton", torch.device("cpu"))


def test_missing_cpu_flags_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.delenv("DEEPFLOW_KERNELS", raising=False)
    assert "avx512_bf16" in (kernels.unavailable_reason() or "")
