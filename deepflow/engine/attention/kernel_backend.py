"""Attention through FlowServe's C++ kernels (engine/kernels/csrc/attention.cpp): K/V read in place.

One `paged_attention` call per layer covers every sequence of the step, decodes and prefill chunks alike:
the kernel walks each sequence's block table, so nothing is gathered and no per-chunk Python loop runs.
With a shared decode prefix (cascade), that prefix is attended once for all decode queries (non-causal, one
"sequence" of D queries) and merged with the per-sequence suffixes through their log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepflow.engine.attention.base import AttentionBackend, KVCache
from deepflow.engine.attention.metadata import AttentionMetadata


@dataclass
class _Prepared:
    block_tables: torch.Tensor  # [N, W] int32
    seq_lens: torch.Tensor  # [N] int32
    query_start_loc: torch.Tensor  # [N + 1] int32
    cos: torch.Tensor  # [T, 1, hd]
    sin: torch.Tensor
    # Cascade: the shared prefix as one non-causal sequence over the D decode queries.
    shared_table: torch.Tensor | None = None
    shared_lens: torch.Tensor | None = None
    shared_start: torch.Tensor | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KernelAttention(AttentionBackend):
    name = "kernels"

    def prepare(self, meta: AttentionMetadata) -> None:
        bs, d = meta.block_size, meta.num_decodes
        tables, lens = meta.block_tables, meta.seq_lens
        shared = meta.cascade_blocks if d else 0
        if shared:
            tables = [t[shared:] for t in tables[:d]] + tables[d:]
            lens = [n - shared * bs for n in lens[:d]] + lens[d:]
        width = max(-(-n // bs) for n in lens) if lens else 0
        padded = [t[:width] + [0] * (width - len(t[:width])) for t in tables]
        starts = [0]
        for qlen in meta.query_lens:
            starts.append(starts[-1] + qlen)
        prepared = _Prepared(
            block_tables=torch.tensor(padded, dtype=torch.int32).view(len(padded), width),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            cos=self.cos[meta.positions].unsqueeze(1),
            sin=self.sin[meta.positions].unsqueeze(1),
        )
        if shared:
            prepared.shared_table = torch.tensor([meta.block_tables[0][:shared]], dtype=torch.int32)
            prepared.shared_lens = torch.tensor([shared * bs], dtype=torch.int32)
            prepared.shared_start = torch.tensor([0, d], dtype=torch.int32)
        meta.prepared = prepared

    def store_kv(
        self, qk: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prepared: _Prepared = meta.prepared
        qk = qk * prepared.cos + _rotate_half(qk) * prepared.sin
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        k_cache, v_cache = kv_cache
        kvh, hd = self.num_kv_heads, self.head_dim
        k_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        return q, k

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        prepared: _Prepared = meta.prepared
        k_cache, v_cache = kv_cache
        q = q.contiguous()
        out = torch.empty_like(q)
        if prepared.shared_table is None:
            torch.ops.deepflow.paged_attention(
                out, None, q, k_cache, v_cache, prepared.block_tables, prepared.seq_lens,
                prepared.query_start_loc, self.scale, True,
            )  # fmt: skip
            return out
        d = meta.num_decodes
        lse = torch.empty(q.shape[0], self.num_heads, dtype=torch.float32)
        torch.ops.deepflow.paged_attention(
            out, lse, q, k_cache, v_cache, prepared.block_tables, prepared.seq_lens,
            prepared.query_start_loc, self.scale, True,
        )  # fmt: skip
        shared_out = torch.empty_like(q[:d])
        shared_lse = torch.empty(d, self.num_heads, dtype=torch.float32)
        torch.ops.deepflow.paged_attention(
            shared_out, shared_lse, q[:d], k_cache, v_cache, prepared.shared_table, prepared.shared_lens,
            prepared.shared_start, self.scale, False,
        )  # fmt: skip
        torch.ops.deepflow.merge_attention_states(out[:d], out[:d], lse[:d], shared_out, shared_lse)
        return out
