"""Fused small ops of a decoder layer (fp32 and bf16), each with the torch reference it reproduces.

Exactness against the references below (tests/engine/kernels/test_linear_fused_kernels.py):
  rms_norm, fused_add_rms_norm  bit-identical in fp32 and bf16 (HF order: x32 * rsqrt(mean(x32^2) + eps),
                                cast to the dtype, times the weight in the dtype; the sum of squares is
                                added up in ATen's own order) for rows under 32768 elements.
  silu_and_mul                  bit-identical in fp32 and bf16 with `F.silu(gate) * up` (torch's exp on the
                                same elements, silu rounded to the dtype, then the product rounded).
  rope_and_cache                bit-identical with `qk * cos + rotate_half(qk) * sin` (one rounding per op
                                in the dtype) and the caches' index_copy_.
The wrappers take the kernel when the library has it (`kernels.available(op)`), else the reference, so
their results do not depend on which one ran. `init_cpu_threads` needs the library.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepflow.engine import kernels


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---- references ------------------------------------------------------------------------------------------


def rms_norm_reference(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """out = weight * dtype(x32 * rsqrt(mean(x32^2, -1) + eps)) (HF's LlamaRMSNorm order)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out.copy_(weight * x32.to(x.dtype))


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """residual += x (in the dtype); x = rms_norm(residual) * weight (vLLM's fused_add_rms_norm)."""
    residual.add_(x)
    rms_norm_reference(x, residual, weight, eps)


def silu_and_mul_reference(out: torch.Tensor, x: torch.Tensor) -> None:
    """out = silu(x[..., :I]) * x[..., I:] for x [..., 2I]."""
    inter = x.shape[-1] // 2
    out.copy_(F.silu(x[..., :inter]) * x[..., inter:])


def rope_and_cache_reference(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Neox rope over qk [T, H+KVH, hd] in place, then the rotated k heads and v [T, KVH, hd] into the
    [KVH, NB, BS, hd] caches at slot_mapping (slot = block * BS + offset; a negative slot is not cached)."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    qk.copy_(qk * c + _rotate_half(qk) * s)
    k = qk[:, num_heads:]
    hd = qk.shape[-1]
    slots = slot_mapping
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slots, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(num_kv_heads, -1, hd).index_copy_(1, slots, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, hd).index_copy_(1, slots, v.transpose(0, 1))


# ---- wrappers --------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(x)
    if kernels.available("rms_norm"):
        torch.ops.deepflow.rms_norm(out, x, weight, eps)
    else:
        rms_norm_reference(out, x, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual += x, then x = rms_norm(residual); returns (x, residual)."""
    if kernels.available("fused_add_rms_norm"):
        torch.ops.deepflow.fused_add_rms_norm(x, residual, weight, eps)
    else:
        fused_add_rms_norm_reference(x, residual, weight, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    if kernels.available("silu_and_mul"):
        torch.ops.deepflow.silu_and_mul(out, x)
    else:
        silu_and_mul_reference(out, x)
    return out


def rope_and_cache(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    args = (qk, v, cos, sin, positions, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    if kernels.available("rope_and_cache"):
        torch.ops.deepflow.rope_and_cache(*args)
    else:
        rope_and_cache_reference(*args)


def init_cpu_threads(cpu_ids: Sequence[int]) -> None:
    """Size torch's OpenMP team to len(cpu_ids); pin its thread i (the caller is thread 0) to cpu_ids[i]."""
    if not kernels.available("init_cpu_threads"):
        raise RuntimeError(f"deepflow kernels unavailable: {kernels.unavailable_reason() or 'not loaded'}")
    torch.ops.deepflow.init_cpu_threads(list(cpu_ids))
