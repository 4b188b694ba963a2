"""The layout descriptor (digest, mismatches) and the KV block → span helpers against torch indexing."""

from __future__ import annotations

import itertools

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.flow import KVPoolLayout, LayoutDescriptor, TransferEntry, kv_block_entries, kv_block_spans


def test_digest_is_canonical_and_sensitive(layout):
    same = LayoutDescriptor(**msgspec.structs.asdict(layout))
    assert same.digest() == layout.digest()
    a = msgspec.structs.replace(layout, extra={"x": "1", "y": "2"})
    b = msgspec.structs.replace(layout, extra={"y": "2", "x": "1"})
    assert a.digest() == b.digest() != layout.digest()
    assert msgspec.structs.replace(layout, block_size=8).digest() != layout.digest()
    assert layout.mismatches(same) == []
    assert layout.mismatches(msgspec.structs.replace(layout, head_dim=16)) == ["head_dim: 8 != 16"]


def pool_tensors(pool: KVPoolLayout, seed: int) -> tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A KV region's bytes and the per-layer (K, V) bf16 tensors viewing them, as `allocate_kv_pool` lays
    them out."""
    raw = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, pool.total_bytes, dtype=np.uint8))
    flat = raw.view(torch.bfloat16)
    n = flat.numel() // (2 * pool.layout.num_layers)
    tensors = [
        (
            flat[(2 * i) * n : (2 * i + 1) * n].view(pool.tensor_shape),
            flat[(2 * i + 1) * n : (2 * i + 2) * n].view(pool.tensor_shape),
        )
        for i in range(pool.layout.num_layers)
    ]
    return raw.numpy(), tensors


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=8, unique=True))
def test_kv_block_spans_cover_exactly_the_blocks(layout, block_ids):
    pool = KVPoolLayout(layout=layout, num_blocks=10)
    raw, tensors = pool_tensors(pool, 0)
    spans = kv_block_spans(pool, block_ids)
    got = np.concatenate([raw[o : o + n] for o, n in spans])
    # The same bytes in the order the spans promise: layer, K then V, head, the blocks (runs merged).
    want = torch.cat(
        [
            t[h, b].reshape(-1)
            for k, v in tensors
            for t in (k, v)
            for h in range(layout.num_kv_heads)
            for b in block_ids
        ]
    )
    assert np.array_equal(got, want.view(torch.uint8).numpy())
    runs = 1 + sum(1 for a, b in itertools.pairwise(block_ids) if b != a + 1)
    assert len(spans) == 2 * layout.num_layers * layout.num_kv_heads * runs


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_kv_block_entries_move_blocks_between_pools_of_different_sizes(layout, data):
    src_pool, dst_pool = KVPoolLayout(layout=layout, num_blocks=7), KVPoolLayout(layout=layout, num_blocks=12)
    n = data.draw(st.integers(1, 7))
    src_blocks = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n, unique=True))
    dst_blocks = data.draw(st.lists(st.integers(0, 11), min_size=n, max_size=n, unique=True))
    src_raw, src_t = pool_tensors(src_pool, 1)
    dst_raw, dst_t = pool_tensors(dst_pool, 2)
    before = [(k.clone(), v.clone()) for k, v in dst_t]
    for e in kv_block_entries(src_pool, "p", src_blocks, dst_pool, "d", dst_blocks):
        assert isinstance(e, TransferEntry) and (e.src_region, e.dst_region) == ("p", "d")
        dst_raw[e.dst_offset : e.dst_offset + e.length] = src_raw[e.src_offset : e.src_offset + e.length]
    for layer in range(layout.num_layers):
        for kv in (0, 1):
            want = before[layer][kv].clone()
            want[:, dst_blocks] = src_t[layer][kv][:, src_blocks]
            assert torch.equal(dst_t[layer][kv].view(torch.uint8), want.view(torch.uint8))


def test_kv_helpers_refuse_bad_input(layout):
    pool = KVPoolLayout(layout=layout, num_blocks=4)
    with pytest.raises(ValueError, match="block id 4"):
        kv_block_spans(pool, [4])
    with pytest.raises(ValueError, match="2 source blocks for 1"):
        kv_block_entries(pool, "a", [0, 1], pool, "b", [0])
    other = KVPoolLayout(layout=msgspec.structs.replace(layout, dtype="float16"), num_blocks=4)
    with pytest.raises(ValueError, match="dtype"):
        kv_block_entries(pool, "a", [0], other, "b", [0])


def test_layer_subset_for_layer_wise_transfer(layout):
    pool = KVPoolLayout(layout=layout, num_blocks=4)
    spans = kv_block_spans(pool, [1, 2], layers=[1])
    assert spans[0][0] == pool.tensor_offset(1, 0) + pool.num_blocks * 0 + pool.block_bytes
    assert len(spans) == 2 * layout.num_kv_heads
    assert all(pool.tensor_offset(1, 0) <= o < pool.tensor_offset(2, 0) for o, _ in spans)


def test_pool_for_a_peer_region(layout):
    pool = KVPoolLayout(layout=layout, num_blocks=11)
    assert KVPoolLayout.for_region(layout, pool.total_bytes) == pool
    with pytest.raises(ValueError, match="whole number"):
        KVPoolLayout.for_region(layout, pool.total_bytes + 2)
