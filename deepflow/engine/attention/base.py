"""The attention backend contract: one object per model, stateless across steps except reusable buffers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from deepflow.engine.attention.metadata import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]  # (K, V) of one layer, each [KV heads, blocks, block size, hd]


@dataclass
class VarlenCall:
    """One varlen paged-attention call over a step's sequences (int32 CPU tensors; kernels/attention.py)."""

    block_tables: torch.Tensor  # [N, W]
    seq_lens: torch.Tensor  # [N]
    query_start_loc: torch.Tensor  # [N + 1], relative to the call's first query
    causal: bool = True


class AttentionBackend(ABC):
    """Writes a layer's K/V into the paged cache and attends over it, for any mix of decodes and chunks.

    Call order per step: `prepare(meta)` once (on the model thread, before the first layer), then for every
    layer `store_kv` followed by `forward`. Caches are owned by the model runner (their blocks by the RTC); a
    backend only reads and writes slots the metadata names.
    """

    name: ClassVar[str]

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        # Rope tables [max positions, head_dim] in the model dtype (neox layout: the two halves rotate).
        self.cos = cos
        self.sin = sin

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> None:
        """Build this step's tensors into `meta.prepared` (once; every layer reuses them)."""

    @abstractmethod
    def store_kv(
        self, qk: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k (`qk` [T, H + KVH, hd]) by their positions and write k and v ([T, KVH, hd]) to the
        cache; returns the rotated (q, k). Rope lives here so a backend can fuse it with the cache write."""

    def single_call(self, meta: AttentionMetadata) -> VarlenCall | None:
        """When the whole prepared step is one causal paged-attention call with rope fused into the cache
        write (the kernels in bf16, no cascade): that call, so a fused decoder layer can make it itself."""
        return None

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Attention output [T, H, hd] for this step's queries over each sequence's cached context."""
