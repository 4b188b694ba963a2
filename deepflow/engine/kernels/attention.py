"""Paged attention over a block-table KV cache: the C++ kernels (csrc/attention.cpp), their torch reference.

One varlen call serves decodes, prefills, prefill chunks, mixed batches and the parts of a cascade:

- `q` [T, H, hd] (float32 or bfloat16), caches `k_cache`/`v_cache` [KVH, NB, BS, hd] of the same dtype,
  `block_tables` [N, W], `seq_lens` [N], `query_start_loc` [N+1] (int32; everything CPU and contiguous).
- Sequence n owns queries `q[qsl[n]:qsl[n+1]]` (qlen_n, may be 0) and keys/values at positions
  `0..seq_lens[n]-1`; position p lives in block `block_tables[n, p // BS]`, slot `p % BS`. The queries' own
  K/V must already be in the cache.
- `causal=True`: query j of sequence n sits at position `seq_lens[n] - qlen_n + j` and sees keys up to and
  including it. `causal=False`: every query sees all `seq_lens[n]` keys (a shared prefix attended once by
  all decodes' queries, as one "sequence" whose queries are the decode tokens).
- Query head h reads KV head `h // (H // KVH)`; scores are `scale * q.k`, softmax in fp32.
- A query that sees no key gets 0 output and lse -inf. `lse` [T, H] fp32 is `log(sum(exp(scores)))`
  (natural log), so results over disjoint key sets merge exactly with `merge_attention_states`.

Without the kernel library (`deepflow.engine.kernels.load()` False, or a head_dim the kernels don't take)
the reference implementation runs instead: same results, not fast.
"""

from __future__ import annotations

import math

import torch

from deepflow.engine import kernels

# Head dims the C++ kernels take; others take the reference path.
KERNEL_HEAD_DIMS = frozenset({16, 32, 64, 128, 256})


def _use_kernel(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.shape[-1] in KERNEL_HEAD_DIMS
        and kernels.load()
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over its sequence's paged K/V; `out` (or a new tensor) [T, H, hd].

    With `return_lse`, also the fp32 [T, H] log-sum-exp of the scaled scores.
    """
    if not _use_kernel(q, k_cache):
        return paged_attention_reference(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, causal, out, return_lse
        )
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32) if return_lse else None
    torch.ops.deepflow.paged_attention(
        out,
        lse,
        q,
        k_cache,
        v_cache,
        block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(),
        query_start_loc.to(torch.int32).contiguous(),
        float(scale),
        bool(causal),
    )
    return (out, lse) if return_lse else out


def merge_attention_states(
    a: torch.Tensor,
    lse_a: torch.Tensor,
    b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions of the same queries over disjoint key sets (weights from their lse).

    `out` may be `a` or `b`. With `return_lse`, also the merged lse (`logaddexp(lse_a, lse_b)`).
    """
    if not _use_kernel(a, a):
        return merge_attention_states_reference(a, lse_a, b, lse_b, out, return_lse)
    if out is None:
        out = torch.empty_like(a)
    torch.ops.deepflow.merge_attention_states(
        out, a.contiguous(), lse_a.float().contiguous(), b.contiguous(), lse_b.float().contiguous()
    )
    return (out, torch.logaddexp(lse_a.float(), lse_b.float())) if return_lse else out


# ----------------------------------------------------------------------------------------------------------
# Pure-torch references (what the kernels are tested against, and the fallback).


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gather each sequence's K/V through its block table and attend in fp32 (correct, not fast)."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // kv_heads
    result = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((num_tokens, num_heads), -math.inf, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for n, length in enumerate(lens):
        start, end = starts[n], starts[n + 1]
        qlen = end - start
        if qlen == 0 or length == 0:
            continue
        used = -(-length // block_size)
        blocks = block_tables[n, :used].long().to(k_cache.device)
        keys = k_cache.index_select(1, blocks).reshape(kv_heads, used * block_size, head_dim)[:, :length]
        values = v_cache.index_select(1, blocks).reshape(kv_heads, used * block_size, head_dim)[:, :length]
        qq = q[start:end].float().reshape(qlen, kv_heads, group, head_dim)
        scores = torch.einsum("qkgd,kld->kgql", qq, keys.float()) * scale  # [KVH, G, qlen, L]
        if causal:
            positions = length - qlen + torch.arange(qlen, device=q.device)
            hidden = torch.arange(length, device=q.device)[None, :] > positions[:, None]
            scores = scores.masked_fill(hidden, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
        probs = torch.where(
            torch.isfinite(row_lse)[..., None],
            torch.exp(scores - row_lse[..., None]),
            torch.zeros((), device=q.device),
        )
        o = torch.einsum("kgql,kld->qkgd", probs, values.float())
        result[start:end] = o.reshape(qlen, num_heads, head_dim)
        lse[start:end] = row_lse.permute(2, 0, 1).reshape(qlen, num_heads)
    if out is None:
        out = result.to(q.dtype)
    else:
        out.copy_(result)
    return (out, lse) if return_lse else out


def merge_attention_states_reference(
    a: torch.Tensor,
    lse_a: torch.Tensor,
    b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    merged = (a.float() * (wa / safe)[..., None] + b.float() * (wb / safe)[..., None]).to(a.dtype)
    if out is None:
        out = merged
    else:
        out.copy_(merged)
    return (out, torch.logaddexp(lse_a, lse_b)) if return_lse else out
