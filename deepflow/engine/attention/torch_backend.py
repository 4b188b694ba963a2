"""Attention in plain torch ops: runs on any device (CPU, CUDA) and is the reference the kernels match.

Decodes gather their K/V blocks into one dense buffer and attend with two batched matmuls (GQA without
repeating K/V); prefill chunks go through SDPA, over their own K/V when the chunk is the whole sequence so
far, else over the gathered cached context with a causal mask offset by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepflow.engine.attention.base import AttentionBackend, KVCache
from deepflow.engine.attention.metadata import AttentionMetadata

_MASKED = float("-inf")


@dataclass
class _Prepared:
    decode_block_table: torch.Tensor | None  # [D, W] (padded with block 0, masked out)
    decode_mask: torch.Tensor | None  # additive [1, D, 1, W * block_size]
    decode_gather: tuple[torch.Tensor, torch.Tensor] | None
    shared_blocks: torch.Tensor | None  # cascade: the prefix every decode shares
    cos: torch.Tensor  # [T, 1, hd]
    sin: torch.Tensor
    prefill_ranges: list[tuple[int, int]]  # token range of each chunk
    prefill_blocks: list[torch.Tensor | None]  # None: the chunk is the whole sequence (its own K/V)
    prefill_kv_lens: list[int]
    prefill_masks: list[torch.Tensor | None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchAttention(AttentionBackend):
    name = "torch"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        # Decode attention gathers K/V blocks into one persistent buffer: a fresh tensor per layer costs 3x
        # more (measured: 0.8 vs 0.23 ms for 768 blocks), mostly in first-touch page faults.
        self._gather_buffer = torch.empty(0, dtype=self.cos.dtype, device=self.cos.device)

    def prepare(self, meta: AttentionMetadata) -> None:
        device = self.cos.device
        d, bs = meta.num_decodes, meta.block_size
        cos = self.cos[meta.positions].unsqueeze(1)
        sin = self.sin[meta.positions].unsqueeze(1)
        prepared = _Prepared(None, None, None, None, cos, sin, [], [], [], [])
        if d:
            tables, lens = meta.block_tables[:d], meta.seq_lens[:d]
            if meta.cascade_blocks:
                shared = meta.cascade_blocks
                prepared.shared_blocks = torch.tensor(tables[0][:shared], dtype=torch.long, device=device)
                tables = [t[shared:] for t in tables]
                lens = [n - shared * bs for n in lens]
            width = -(-max(lens) // bs)
            padded = [t[:width] + [0] * (width - len(t[:width])) for t in tables]
            prepared.decode_block_table = torch.tensor(padded, dtype=torch.long, device=device)
            span = width * bs
            lengths = torch.tensor(lens, dtype=torch.long, device=device).unsqueeze(1)
            mask = torch.zeros(d, span, dtype=torch.float32, device=device)
            mask.masked_fill_(torch.arange(span, device=device).unsqueeze(0) >= lengths, _MASKED)
            prepared.decode_mask = mask.view(1, d, 1, span)  # broadcast over KV heads and the query group
            prepared.decode_gather = self._gather_buffers(d * width, bs)
        first = d
        for i in range(d, len(meta.query_lens)):
            qlen, end = meta.query_lens[i], meta.seq_lens[i]
            start = end - qlen
            prepared.prefill_ranges.append((first, first + qlen))
            first += qlen
            prepared.prefill_kv_lens.append(end)
            if start == 0:
                prepared.prefill_blocks.append(None)
                prepared.prefill_masks.append(None)
                continue
            blocks = meta.block_tables[i][: -(-end // bs)]
            prepared.prefill_blocks.append(torch.tensor(blocks, dtype=torch.long, device=device))
            query_pos = torch.arange(start, end, device=device).unsqueeze(1)
            prepared.prefill_masks.append(torch.arange(end, device=device).unsqueeze(0) <= query_pos)
        meta.prepared = prepared

    def _gather_buffers(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_kv_heads, num_blocks, block_size, self.head_dim)
        size = shape[0] * shape[1] * shape[2] * shape[3]
        if self._gather_buffer.numel() < 2 * size:
            self._gather_buffer = torch.empty(2 * size, dtype=self.cos.dtype, device=self.cos.device)
        return self._gather_buffer[:size].view(shape), self._gather_buffer[size : 2 * size].view(shape)

    def store_kv(
        self, qk: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prepared: _Prepared = meta.prepared
        # Rotate q and k heads together: one set of rope ops per layer instead of two.
        qk = qk * prepared.cos + _rotate_half(qk) * prepared.sin
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        # Caches are [KVH, blocks, block_size, hd]: head-major, so K/V gathered by whole blocks (a few KB of
        # contiguous memory each) line up per (head, sequence) for batched matmuls with no transposing copy.
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
        kvh, hd = self.num_kv_heads, self.head_dim
        v = v.view(-1, kvh, hd)
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, prepared)
        self._prefill_chunks(out, q, k, v, kv_cache, prepared)
        return out

    def _prefill_chunks(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        prepared: _Prepared,
    ) -> None:
        k_cache, v_cache = kv_cache
        kvh, hd = self.num_kv_heads, self.head_dim
        v = v.view(-1, kvh, hd)
        for (start, end), blocks, kv_len, mask in zip(
            prepared.prefill_ranges,
            prepared.prefill_blocks,
            prepared.prefill_kv_lens,
            prepared.prefill_masks,
            strict=True,
        ):
            if blocks is None:
                keys, values = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
            else:
                keys = k_cache.index_select(1, blocks).view(kvh, -1, hd)[:, :kv_len]
                values = v_cache.index_select(1, blocks).view(kvh, -1, hd)[:, :kv_len]
            out[start:end] = self._prefill(q[start:end], keys, values, mask)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: _Prepared
    ) -> torch.Tensor:
        # One query token per sequence: the heads sharing a KV head form a [group, head_dim] query block,
        # so batched matmuls over (KV head, sequence) serve GQA without repeating K/V.
        assert prepared.decode_block_table is not None and prepared.decode_mask is not None
        assert prepared.decode_gather is not None
        d = prepared.decode_block_table.shape[0]
        lmax = prepared.decode_mask.shape[-1]
        kvh, group, hd = self.num_kv_heads, self.group, self.head_dim
        flat = prepared.decode_block_table.view(-1)
        k_buf, v_buf = prepared.decode_gather
        keys = torch.index_select(k_cache, 1, flat, out=k_buf).view(kvh * d, lmax, hd)
        values = torch.index_select(v_cache, 1, flat, out=v_buf).view(kvh * d, lmax, hd)
        qg = q.view(d, kvh, group, hd).transpose(0, 1).reshape(kvh * d, group, hd)
        scores = torch.bmm(qg, keys.transpose(1, 2)).float().view(kvh, d, group, lmax)
        scores = scores * self.scale + prepared.decode_mask
        shared = prepared.shared_blocks
        if shared is None:
            probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kvh * d, group, lmax)
            out = torch.bmm(probs, values).view(kvh, d, group, hd)
            return out.transpose(0, 1).reshape(d, self.num_heads, hd)
        # Cascade: the shared prefix's K/V are read once for all d sequences' queries; one softmax spans
        # both parts, so the result is the same attention over prefix + suffix.
        shared_keys = k_cache.index_select(1, shared).view(kvh, -1, hd)
        shared_values = v_cache.index_select(1, shared).view(kvh, -1, hd)
        ls = shared_keys.shape[1]
        qs = qg.view(kvh, d * group, hd)
        shared_scores = torch.bmm(qs, shared_keys.transpose(1, 2)).float().view(kvh, d, group, ls)
        probs = torch.softmax(torch.cat([shared_scores * self.scale, scores], dim=-1), dim=-1)
        probs = probs.to(values.dtype)
        out = torch.bmm(probs[..., :ls].reshape(kvh, d * group, ls), shared_values).view(kvh, d, group, hd)
        out += torch.bmm(probs[..., ls:].reshape(kvh * d, group, lmax), values).view(kvh, d, group, hd)
        return out.transpose(0, 1).reshape(d, self.num_heads, hd)

    def _prefill(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # q [T, H, hd] -> [1, H, T, hd]; keys/values come as [KVH, L, hd]. SDPA handles GQA and the causal
        # mask (offset by the cached context).
        qh = q.transpose(0, 1).unsqueeze(0)
        kh = keys.unsqueeze(0)
        vh = values.unsqueeze(0)
        if mask is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
