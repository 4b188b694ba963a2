"""The attention backend for training: the engine's layers run unchanged, attention is differentiable.

Serving backends write K/V into the paged cache and attend over it; training has no cache. This backend
rotates q/k with the model's own rope tables (the torch backend's neox formula) and attends with SDPA
under a block-diagonal causal mask: a flat batch holds several packed examples (`segment_ids`), and a token
sees only earlier tokens of its own example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepflow.engine.attention.base import AttentionBackend, KVCache
from deepflow.engine.attention.torch_backend import _rotate_half  # the serving backend's rope, shared

__all__ = ["TrainingAttention", "TrainingMetadata"]


@dataclass
class TrainingMetadata:
    positions: torch.Tensor  # [T] rope positions (restart at 0 per example)
    segment_ids: torch.Tensor  # [T] example ids; unique across the whole flat batch
    mask: torch.Tensor | None = None  # built by prepare: [T, T] bool, True = may attend

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


class TrainingAttention(AttentionBackend):
    name = "training"

    def prepare(self, meta: TrainingMetadata) -> None:  # type: ignore[override]
        seg = meta.segment_ids
        t = torch.arange(seg.shape[0], device=seg.device)
        meta.mask = (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])

    def store_kv(  # type: ignore[override]
        self, qk: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None, meta: TrainingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[meta.positions].unsqueeze(1)
        sin = self.sin[meta.positions].unsqueeze(1)
        qk = qk * cos + _rotate_half(qk) * sin
        return qk[:, : self.num_heads], qk[:, self.num_heads :]

    def forward(  # type: ignore[override]
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache | None,
        meta: TrainingMetadata,
    ) -> torch.Tensor:
        assert meta.mask is not None, "prepare() builds the mask"
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=meta.mask, scale=self.scale
        )
        return out.transpose(0, 1)
