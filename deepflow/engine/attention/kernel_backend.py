"""Attention through FlowServe's C++ kernels (engine/kernels/csrc/attention.cpp): decodes read K/V in place.

All decodes of a step are one `paged_attention` call per layer: the kernel walks each sequence's block
table, so nothing is gathered. With a shared decode prefix (cascade) that prefix is attended once for all
decode queries (one non-causal "sequence" of D queries) and merged with the per-sequence suffixes through
their log-sum-exp. Prefill chunks still go through torch's SDPA (inherited from the torch backend): the
kernel's tiled many-query path is faster (benchmarks/attention_kernels.py) but is not yet wired here, pending
the fp32 HF-equivalence run with chunks on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepflow.engine.attention.base import KVCache
from deepflow.engine.attention.metadata import AttentionMetadata
from deepflow.engine.attention.torch_backend import TorchAttention


@dataclass
class _Decodes:
    block_tables: torch.Tensor  # [D, W] int32
    seq_lens: torch.Tensor  # [D] int32
    query_start_loc: torch.Tensor  # [D + 1] int32
    # Cascade: the shared prefix as one non-causal sequence over the D decode queries.
    shared_table: torch.Tensor | None = None
    shared_lens: torch.Tensor | None = None
    shared_start: torch.Tensor | None = None


class KernelAttention(TorchAttention):
    name = "kernels"
    gathers_decodes = False

    def prepare(self, meta: AttentionMetadata) -> None:
        super().prepare(meta)  # rope rows and the prefill chunks' tensors
        d, bs = meta.num_decodes, meta.block_size
        if not d:
            return
        tables, lens = meta.block_tables[:d], meta.seq_lens[:d]
        shared = meta.cascade_blocks
        if shared:
            tables = [t[shared:] for t in tables]
            lens = [n - shared * bs for n in lens]
        width = max(-(-n // bs) for n in lens)
        padded = [t[:width] + [0] * (width - len(t[:width])) for t in tables]
        decodes = _Decodes(
            block_tables=torch.tensor(padded, dtype=torch.int32).view(d, width),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            query_start_loc=torch.arange(d + 1, dtype=torch.int32),
        )
        if shared:
            decodes.shared_table = torch.tensor([meta.block_tables[0][:shared]], dtype=torch.int32)
            decodes.shared_lens = torch.tensor([shared * bs], dtype=torch.int32)
            decodes.shared_start = torch.tensor([0, d], dtype=torch.int32)
        meta.prepared.kernel_decodes = decodes

    def store_kv(
        self, qk: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if qk.dtype != torch.bfloat16:
            return super().store_kv(qk, v, kv_cache, meta)  # fp32: torch's rope, bit-exact with HF
        # One pass: rope on q and k in place, then k and v into their cache slots (csrc/fused.cpp).
        k_cache, v_cache = kv_cache
        torch.ops.deepflow.rope_and_cache(
            qk, v, self.cos, self.sin, meta.positions, k_cache, v_cache, meta.slot_mapping,
            self.num_heads, self.num_kv_heads,
        )  # fmt: skip
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            self._decode_kernel(out[:d], q[:d].contiguous(), kv_cache, meta.prepared.kernel_decodes)
        self._prefill_chunks(out, q, k, v, kv_cache, meta.prepared)
        return out

    def _decode_kernel(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, dec: _Decodes) -> None:
        k_cache, v_cache = kv_cache
        if dec.shared_table is None:
            torch.ops.deepflow.paged_attention(
                out, None, q, k_cache, v_cache, dec.block_tables, dec.seq_lens, dec.query_start_loc,
                self.scale, True,
            )  # fmt: skip
            return
        d = q.shape[0]
        own, own_lse = torch.empty_like(q), torch.empty(d, self.num_heads, dtype=torch.float32)
        torch.ops.deepflow.paged_attention(
            own, own_lse, q, k_cache, v_cache, dec.block_tables, dec.seq_lens, dec.query_start_loc,
            self.scale, True,
        )  # fmt: skip
        shared, shared_lse = torch.empty_like(q), torch.empty(d, self.num_heads, dtype=torch.float32)
        torch.ops.deepflow.paged_attention(
            shared, shared_lse, q, k_cache, v_cache, dec.shared_table, dec.shared_lens, dec.shared_start,
            self.scale, False,
        )  # fmt: skip
        torch.ops.deepflow.merge_attention_states(out, own, own_lse, shared, shared_lse)
