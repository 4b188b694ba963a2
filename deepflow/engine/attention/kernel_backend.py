"""Attention through FlowServe's C++ kernels (engine/kernels/csrc/attention.cpp): K/V read in place.

A step is one varlen `paged_attention` call per layer over every sequence, decodes and prefill chunks
alike: the kernel walks each sequence's block table (decodes one query each, chunks tiled flash-style with
the causal offset of their cached context), so nothing is gathered. With a shared decode prefix (cascade)
that prefix is attended once for all decode queries (one non-causal "sequence" of D queries) and merged with
the per-sequence suffixes through their log-sum-exp; the chunks then take a call of their own.

In bf16, rope and the K/V cache write are one fused op (`rope_and_cache`); in fp32 rope stays torch's, so the
rotated values are bit-exact with HF's (attention itself is not bit-exact with any other implementation;
tests/engine/test_hf_equivalence.py checks the greedy tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepflow.engine.attention.base import AttentionBackend, KVCache, VarlenCall
from deepflow.engine.attention.metadata import AttentionMetadata


def _varlen(tables: list[list[int]], lens: list[int], qlens: list[int], bs: int, causal: bool) -> VarlenCall:
    width = max(1, max(-(-n // bs) for n in lens))
    padded = [t[:width] + [0] * (width - len(t[:width])) for t in tables]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    return VarlenCall(
        block_tables=torch.tensor(padded, dtype=torch.int32).view(len(tables), width),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        causal=causal,
    )


@dataclass
class _KernelPlan:
    cos: torch.Tensor | None  # fp32 only: torch's rope rows [T, 1, hd]
    sin: torch.Tensor | None
    everything: VarlenCall | None = None  # no cascade: all sequences in one call
    decodes: VarlenCall | None = None  # cascade: the decodes' own suffixes ...
    shared: VarlenCall | None = None  # ... the shared prefix once for all decode queries ...
    chunks: VarlenCall | None = None  # ... and the prefill chunks


class KernelAttention(AttentionBackend):
    name = "kernels"

    def prepare(self, meta: AttentionMetadata) -> None:
        d, bs = meta.num_decodes, meta.block_size
        tables, lens, qlens = meta.block_tables, meta.seq_lens, meta.query_lens
        fp32 = self.cos.dtype != torch.bfloat16
        plan = _KernelPlan(
            cos=self.cos[meta.positions].unsqueeze(1) if fp32 else None,
            sin=self.sin[meta.positions].unsqueeze(1) if fp32 else None,
        )
        shared = meta.cascade_blocks
        if not shared:
            plan.everything = _varlen(tables, lens, qlens, bs, causal=True)
        else:
            suffixes = [t[shared:] for t in tables[:d]]
            plan.decodes = _varlen(suffixes, [n - shared * bs for n in lens[:d]], [1] * d, bs, causal=True)
            plan.shared = _varlen([tables[0][:shared]], [shared * bs], [d], bs, causal=False)
            if len(qlens) > d:
                plan.chunks = _varlen(tables[d:], lens[d:], qlens[d:], bs, causal=True)
        meta.prepared = plan

    def single_call(self, meta: AttentionMetadata) -> VarlenCall | None:
        plan: _KernelPlan = meta.prepared
        return plan.everything if plan.cos is None else None

    def store_kv(
        self, qk: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan: _KernelPlan = meta.prepared
        k_cache, v_cache = kv_cache
        if plan.cos is not None:  # fp32: torch's rope, bit-exact with HF; then a plain slot write
            assert plan.sin is not None
            half = qk.shape[-1] // 2
            qk = qk * plan.cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * plan.sin
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            kvh, hd = self.num_kv_heads, self.head_dim
            k_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
            v_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
            return q, k
        # One pass: rope on q and k in place, then k and v into their cache slots (csrc/fused.cpp).
        torch.ops.deepflow.rope_and_cache(
            qk, v, self.cos, self.sin, meta.positions, k_cache, v_cache, meta.slot_mapping,
            self.num_heads, self.num_kv_heads,
        )  # fmt: skip
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        # The queries' own K/V are in the cache already (store_kv), so k and v are not read here.
        plan: _KernelPlan = meta.prepared
        q = q.contiguous()
        out = torch.empty_like(q)
        if plan.everything is not None:
            self._call(out, None, q, kv_cache, plan.everything)
            return out
        assert plan.decodes is not None and plan.shared is not None
        d = meta.num_decodes
        qd = q[:d]
        own, own_lse = torch.empty_like(qd), torch.empty(d, self.num_heads, dtype=torch.float32)
        self._call(own, own_lse, qd, kv_cache, plan.decodes)
        shared, shared_lse = torch.empty_like(qd), torch.empty(d, self.num_heads, dtype=torch.float32)
        self._call(shared, shared_lse, qd, kv_cache, plan.shared)
        torch.ops.deepflow.merge_attention_states(out[:d], own, own_lse, shared, shared_lse)
        if plan.chunks is not None:
            self._call(out[d:], None, q[d:], kv_cache, plan.chunks)
        return out

    def _call(
        self,
        out: torch.Tensor,
        lse: torch.Tensor | None,
        q: torch.Tensor,
        kv_cache: KVCache,
        call: VarlenCall,
    ) -> None:
        k_cache, v_cache = kv_cache
        torch.ops.deepflow.paged_attention(
            out, lse, q, k_cache, v_cache, call.block_tables, call.seq_lens, call.query_start_loc,
            self.scale, call.causal,
        )  # fmt: skip
