"""deepflow::paged_attention and deepflow::merge_attention_states against the torch reference.

Tolerances:
- fp32: |out - ref| <= 1e-5 + 1e-5 |ref|; the kernel and the reference differ only in summation order and in
  the exp polynomial (~2e-7 relative), with outputs O(1).
- bf16: the kernel's output is compared to the *fp32* reference of the same bf16 inputs, within
  1e-2 + 1e-2 |ref|. The products of bf16 values are exact in fp32 and every sum is fp32, so the error comes
  from two roundings: the output to bf16 (at most 2^-9 |out| = 0.2% relative) and, in the many-query kernel,
  the probabilities to bf16 before P.V (the torch path rounds them too): each weight is off by at most
  2^-9 of itself, so the output moves by at most 2^-9 * max|v|, about 0.008 for the N(0, 1) values here
  (worst case; typically a small fraction of that).
- lse (fp32 in both dtypes): 1e-4 absolute; -inf exactly where a query sees no key.

Cache slots no sequence owns (and positions past each sequence's length) hold NaN, so a kernel reading a
key it should not read fails loudly; block-table entries past a sequence's used blocks are -1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepflow.engine import kernels
from deepflow.engine.kernels.attention import (
    merge_attention_states,
    merge_attention_states_reference,
    paged_attention,
    paged_attention_reference,
)

pytestmark = pytest.mark.skipif(
    not kernels.load(), reason=f"deepflow kernels not loaded: {kernels.unavailable_reason()}"
)

# 150 examples per property (a few seconds each); a profile asking for more (thorough: 2,000) wins.
SETTINGS = settings(
    max_examples=max(150, settings.default.max_examples) if settings.default.max_examples > 100 else 150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}
LSE_ATOL = 1e-4


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float


def make_batch(
    seed: int,
    dtype: torch.dtype,
    head_dim: int,
    kv_heads: int,
    group: int,
    block_size: int,
    seqs: list[tuple[int, int]],  # (seq_len, query_len)
    extra_width: int = 0,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    used = [-(-length // block_size) for length, _ in seqs]
    num_blocks = sum(used) + 3
    width = max([1, *used]) + extra_width
    ids = torch.randperm(num_blocks, generator=g).tolist()  # shuffled, non-contiguous blocks
    shape = (kv_heads, num_blocks, block_size, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype)
    v_cache = torch.full(shape, math.nan, dtype=dtype)
    tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
    at = 0
    for n, (length, _) in enumerate(seqs):
        blocks = ids[at : at + used[n]]
        at += used[n]
        tables[n, : used[n]] = torch.tensor(blocks, dtype=torch.int32)
        for p in range(length):
            b, s = blocks[p // block_size], p % block_size
            k_cache[:, b, s] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
            v_cache[:, b, s] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
    qlens = [qlen for _, qlen in seqs]
    q = torch.randn(sum(qlens), kv_heads * group, head_dim, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(qlens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([length for length, _ in seqs], dtype=torch.int32)
    return Batch(q, k_cache, v_cache, tables, seq_lens, qsl, head_dim**-0.5)


def reference(b: Batch, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference on the (possibly bf16) inputs."""
    out, lse = paged_attention_reference(
        b.q.float(),
        b.k_cache.float(),
        b.v_cache.float(),
        b.block_tables,
        b.seq_lens,
        b.query_start_loc,
        b.scale,
        causal,
        return_lse=True,
    )
    return out, lse


def assert_close_out(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "NaN in the kernel's output (read an unwritten cache slot?)"
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def assert_close_lse(lse: torch.Tensor, ref: torch.Tensor) -> None:
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "-inf lse exactly where no key is visible"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(lse[finite], ref[finite], atol=LSE_ATOL, rtol=0)


def run_kernel(b: Batch, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = paged_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.block_tables,
        b.seq_lens,
        b.query_start_loc,
        b.scale,
        causal,
        return_lse=True,
    )
    return out, lse


# ---- strategies ---------------------------------------------------------------------------------------


@st.composite
def seq_len_near_blocks(draw: st.DrawFn, block_size: int, max_len: int) -> int:
    """Lengths at block boundaries (a multiple of the block size, +-1) half the time."""
    if draw(st.booleans()):
        k = draw(st.integers(0, max(0, max_len // block_size)))
        return max(0, min(max_len, k * block_size + draw(st.sampled_from([-1, 0, 1]))))
    return draw(st.integers(0, max_len))


@st.composite
def batches(draw: st.DrawFn, causal: bool) -> tuple[Batch, torch.dtype]:
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    head_dim = draw(st.sampled_from([64, 128, 16, 32]))
    group = draw(st.integers(1, 8))
    kv_heads = draw(st.integers(1, 3))
    block_size = draw(st.sampled_from([1, 16, 32, 5, 3, 7]))
    max_len = 40 if block_size == 1 else 160
    seqs = []
    for _ in range(draw(st.integers(1, 5))):
        length = draw(seq_len_near_blocks(block_size, max_len))
        kind = draw(st.sampled_from(["decode", "decode", "prefill", "chunk", "none", "many"]))
        if kind == "decode":
            qlen = 1
        elif kind == "prefill":
            qlen = min(length, 40)  # fresh when length <= 40
        elif kind == "chunk":
            qlen = draw(st.integers(0, min(length, 40)))
        elif kind == "none":
            qlen = 0
        else:  # more queries than keys: the first ones see nothing when causal
            qlen = draw(st.integers(1, 12))
        seqs.append((length, qlen))
    seed = draw(st.integers(0, 2**31 - 1))
    return make_batch(
        seed, dtype, head_dim, kv_heads, group, block_size, seqs, draw(st.integers(0, 2))
    ), dtype


# ---- properties ---------------------------------------------------------------------------------------


@SETTINGS
@given(case=batches(causal=True))
def test_causal_matches_reference(case: tuple[Batch, torch.dtype]) -> None:
    b, dtype = case
    out, lse = run_kernel(b, causal=True)
    ref_out, ref_lse = reference(b, causal=True)
    assert_close_out(out, ref_out, dtype)
    assert_close_lse(lse, ref_lse)


@SETTINGS
@given(case=batches(causal=False))
def test_non_causal_matches_reference(case: tuple[Batch, torch.dtype]) -> None:
    b, dtype = case
    out, lse = run_kernel(b, causal=False)
    ref_out, ref_lse = reference(b, causal=False)
    assert_close_out(out, ref_out, dtype)
    assert_close_lse(lse, ref_lse)


@SETTINGS
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    head_dim=st.sampled_from([64, 128, 32]),
    group=st.integers(1, 8),
    block_size=st.sampled_from([16, 1, 5, 32]),
    data=st.data(),
)
def test_merge_of_two_partial_calls_equals_one_call(
    dtype: torch.dtype, head_dim: int, group: int, block_size: int, data: st.DataObject
) -> None:
    """Keys [0, P) (P a whole number of blocks, before every query) non-causal + keys [P, L) causal, merged by
    lse, equal one causal call over [0, L) -- the cascade split."""
    qlen = data.draw(st.integers(1, 20))
    prefix_blocks = data.draw(st.integers(0, 4))
    split = prefix_blocks * block_size
    length = split + qlen + data.draw(st.integers(0, 40))
    b = make_batch(
        data.draw(st.integers(0, 2**31 - 1)), dtype, head_dim, 2, group, block_size, [(length, qlen)]
    )
    full, full_lse = run_kernel(b, causal=True)
    part_a, lse_a = paged_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.block_tables,
        torch.tensor([split], dtype=torch.int32),
        b.query_start_loc,
        b.scale,
        causal=False,
        return_lse=True,
    )
    part_b, lse_b = paged_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        b.block_tables[:, prefix_blocks:].contiguous(),
        torch.tensor([length - split], dtype=torch.int32),
        b.query_start_loc,
        b.scale,
        causal=True,
        return_lse=True,
    )
    if split == 0:
        assert torch.isneginf(lse_a).all() and (part_a == 0).all()
    merged, merged_lse = merge_attention_states(part_a, lse_a, part_b, lse_b, return_lse=True)
    ref_out, ref_lse = reference(b, causal=True)
    assert_close_out(merged, ref_out, dtype)
    assert_close_out(full, ref_out, dtype)
    assert_close_lse(merged_lse, ref_lse)
    assert_close_lse(full_lse, ref_lse)


@SETTINGS
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    head_dim=st.sampled_from([64, 128, 20]),
    rows=st.integers(0, 30),
    heads=st.integers(1, 9),
    inf_pattern=st.sampled_from(["none", "a", "b", "both", "mixed"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_kernel_matches_reference(
    dtype: torch.dtype, head_dim: int, rows: int, heads: int, inf_pattern: str, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, heads, head_dim, generator=g).to(dtype)
    b = torch.randn(rows, heads, head_dim, generator=g).to(dtype)
    lse_a = torch.randn(rows, heads, generator=g) * 5
    lse_b = torch.randn(rows, heads, generator=g) * 5
    if inf_pattern in ("a", "both"):
        lse_a[:] = -math.inf
    if inf_pattern in ("b", "both"):
        lse_b[:] = -math.inf
    if inf_pattern == "mixed":
        lse_a[torch.rand(rows, heads, generator=g) < 0.3] = -math.inf
        lse_b[torch.rand(rows, heads, generator=g) < 0.3] = -math.inf
    out = merge_attention_states(a, lse_a, b, lse_b)
    ref = merge_attention_states_reference(a.float(), lse_a, b.float(), lse_b)
    assert_close_out(out, ref, dtype)
    if inf_pattern == "both":
        assert (out == 0).all()
    # In place into a.
    merge_attention_states(a, lse_a, b, lse_b, out=a)
    assert torch.equal(a, out)


# ---- fixed cases ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_long_decodes_split_across_threads(dtype: torch.dtype, threads: int) -> None:
    """Batch 1 and 2 with long contexts: split-K over the thread count (and not), merged exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seqs in ([(1100, 1)], [(3000, 1), (77, 1)], [(1000, 1), (700, 300)]):
            b = make_batch(7, dtype, 64, 3, 3, 16, seqs)
            out, lse = run_kernel(b, causal=True)
            ref_out, ref_lse = reference(b, causal=True)
            assert_close_out(out, ref_out, dtype)
            assert_close_lse(lse, ref_lse)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_mixed_batch(dtype: torch.dtype) -> None:
    """SmolLM2 shapes (9 heads, 3 KV heads, hd 64): decodes, a fresh prefill and a chunk in one call."""
    seqs = [(300 + i, 1) for i in range(8)] + [(48, 48), (1024, 256), (17, 1)]
    b = make_batch(3, dtype, 64, 3, 3, 16, seqs)
    out, lse = run_kernel(b, causal=True)
    ref_out, ref_lse = reference(b, causal=True)
    assert_close_out(out, ref_out, dtype)
    assert_close_lse(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_shared_prefix(dtype: torch.dtype) -> None:
    """D decodes sharing a 4-block prefix: the prefix once as one non-causal "sequence" whose queries are
    the D decode tokens, the suffixes as D decodes, merged, equal each decode over its whole context."""
    bs, prefix_blocks, d = 16, 4, 6
    suffixes = [1, 15, 16, 17, 40, 33]
    seqs = [(prefix_blocks * bs + s, 1) for s in suffixes]
    b = make_batch(11, dtype, 64, 3, 3, bs, seqs)
    # Make the prefix shared: every sequence's first blocks = sequence 0's first blocks.
    tables = b.block_tables.clone()
    tables[:, :prefix_blocks] = tables[0, :prefix_blocks]
    b.block_tables = tables  # the other sequences' own first blocks go unused
    ref_out, _ = reference(b, causal=True)
    prefix_out, prefix_lse = paged_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        tables[:1, :prefix_blocks].contiguous(),
        torch.tensor([prefix_blocks * bs], dtype=torch.int32),
        torch.tensor([0, d], dtype=torch.int32),
        b.scale,
        causal=False,
        return_lse=True,
    )
    suffix_out, suffix_lse = paged_attention(
        b.q,
        b.k_cache,
        b.v_cache,
        tables[:, prefix_blocks:].contiguous(),
        torch.tensor(suffixes, dtype=torch.int32),
        b.query_start_loc,
        b.scale,
        causal=True,
        return_lse=True,
    )
    merged = merge_attention_states(prefix_out, prefix_lse, suffix_out, suffix_lse)
    assert_close_out(merged, ref_out, dtype)


def test_empty_and_fully_masked() -> None:
    b = make_batch(5, torch.float32, 64, 1, 4, 16, [(0, 3), (10, 0), (4, 6), (16, 1)])
    out, lse = run_kernel(b, causal=True)
    assert (out[:3] == 0).all() and torch.isneginf(lse[:3]).all()  # seq_len 0
    assert (out[3:5] == 0).all() and torch.isneginf(lse[3:5]).all()  # 6 queries over 4 keys: 2 see nothing
    assert torch.isfinite(lse[5:]).all()
    ref_out, ref_lse = reference(b, causal=True)
    assert_close_out(out, ref_out, torch.float32)
    assert_close_lse(lse, ref_lse)
    empty = make_batch(5, torch.float32, 64, 1, 4, 16, [(10, 0)])
    out, lse = run_kernel(empty, causal=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_out_argument_and_no_lse() -> None:
    b = make_batch(9, torch.bfloat16, 128, 2, 2, 16, [(33, 1), (20, 20)])
    out = torch.full_like(b.q, 7.0)
    got = paged_attention(
        b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, out=out
    )
    assert got is out
    assert_close_out(out, reference(b, causal=True)[0], torch.bfloat16)


def test_head_dim_outside_the_kernels_takes_the_reference_path() -> None:
    b = make_batch(2, torch.float32, 48, 1, 2, 16, [(20, 1), (9, 9)])
    out, lse = run_kernel(b, causal=True)
    ref_out, ref_lse = reference(b, causal=True)
    assert_close_out(out, ref_out, torch.float32)
    assert_close_lse(lse, ref_lse)


def test_bad_inputs_are_refused() -> None:
    b = make_batch(1, torch.float32, 64, 1, 2, 16, [(20, 1)])
    op = torch.ops.deepflow.paged_attention
    out = torch.empty_like(b.q)
    args = (b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.scale, True)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(out.bfloat16(), None, b.q.bfloat16(), *args)
    bad_table = b.block_tables.clone()
    bad_table[0, 1] = 10_000
    with pytest.raises(RuntimeError, match="block id"):
        op(out, None, b.q, b.k_cache, b.v_cache, bad_table, b.seq_lens, b.query_start_loc, b.scale, True)
    with pytest.raises(RuntimeError, match="seq_lens"):
        op(
            out,
            None,
            b.q,
            b.k_cache,
            b.v_cache,
            b.block_tables,
            torch.tensor([1000], dtype=torch.int32),
            b.query_start_loc,
            b.scale,
            True,
        )
    with pytest.raises(RuntimeError, match="query_start_loc"):
        op(
            out,
            None,
            b.q,
            b.k_cache,
            b.v_cache,
            b.block_tables,
            b.seq_lens,
            torch.tensor([0, 2], dtype=torch.int32),
            b.scale,
            True,
        )
