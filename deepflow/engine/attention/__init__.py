"""Attention backends: how a layer writes its K/V into the paged cache and attends over it.

`torch` (plain torch ops, any device; the reference) and `kernels` (FlowServe's C++ kernels reading blocks
in place, CPU with AVX512-BF16). `select_backend` picks one when the model is built.
"""

from __future__ import annotations

import torch

from deepflow.engine.attention.base import AttentionBackend, KVCache, VarlenCall
from deepflow.engine.attention.metadata import AttentionMetadata
from deepflow.engine.attention.torch_backend import TorchAttention

BACKENDS = ("auto", "kernels", "torch")
KERNEL_OPS = ("paged_attention", "merge_attention_states", "rope_and_cache")

__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "KVCache", "VarlenCall", "select_backend"]


def select_backend(name: str, device: torch.device, head_dim: int | None = None) -> type[AttentionBackend]:
    """`auto`: the kernels on a CPU that has them (and a built library) for a head dim they take, else
    torch; `kernels` insists."""
    from deepflow.engine import kernels
    from deepflow.engine.kernels.attention import KERNEL_HEAD_DIMS

    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    usable = kernels.available(*KERNEL_OPS) and (head_dim is None or head_dim in KERNEL_HEAD_DIMS)
    if name == "torch" or (name == "auto" and (device.type != "cpu" or not usable)):
        return TorchAttention
    if device.type != "cpu":
        raise ValueError(f"the kernels attention backend runs on CPU only, not {device}")
    if not usable:
        reason = kernels.unavailable_reason() or (
            f"head_dim {head_dim} is not one of {sorted(KERNEL_HEAD_DIMS)}"
            if head_dim not in KERNEL_HEAD_DIMS
            else f"the library lacks {', '.join(KERNEL_OPS)}"
        )
        raise RuntimeError(f"attention backend 'kernels' unavailable: {reason}")
    from deepflow.engine.attention.kernel_backend import KernelAttention

    return KernelAttention
