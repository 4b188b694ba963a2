"""Shared-memory segments: pre-faulted, viewed as torch tensors, unlinked on close, orphans swept."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from deepflow.flow import (
    Backend,
    KVPoolLayout,
    TransferAgent,
    allocate_kv_pool,
    allocate_shared,
    kv_block_entries,
    shm,
)
from tests.flow.peer import orphan_segment


def test_segment_is_unlinked_on_close_even_with_views_alive():
    seg = allocate_shared(1 << 16, "t")
    view = seg.tensor(torch.float32, (16, 1024))
    assert seg.name in shm.list_segments(os.getpid())
    view.fill_(2.5)
    peer = shm.ShmSegment.attach(seg.name, seg.size)  # a second mapping sees the same pages
    assert np.array_equal(peer.array[:4], np.array([0, 0, 32, 64], dtype=np.uint8))
    seg.close()
    assert seg.name not in shm.list_segments()
    assert float(view[15, 1023]) == 2.5  # still mapped for whoever holds a view
    peer.close()
    seg.close()  # idempotent


def test_kv_pool_tensors_view_one_segment_in_span_order(layout):
    pool_layout = KVPoolLayout(layout=layout, num_blocks=5)
    pool = allocate_kv_pool(pool_layout)
    try:
        assert len(pool.kv_caches) == layout.num_layers
        k1 = pool.kv_caches[1][0]
        assert k1.shape == pool_layout.tensor_shape and k1.dtype == torch.bfloat16
        k1[2, 3].fill_(1.0)
        offset = pool_layout.block_offset(1, 0, 2, 3)
        region = pool.segment.array[offset : offset + pool_layout.block_bytes]
        assert np.array_equal(region.view(np.uint16), np.full(layout.block_size * layout.head_dim, 0x3F80))
        assert pool.segment.array.sum() == region.sum()  # nothing else written
    finally:
        pool.close()
    assert pool.segment.name not in shm.list_segments()


@pytest.mark.parametrize("dst_in_shm", [True, False])
def test_engine_pools_exchange_blocks(layout, dst_in_shm):
    """Two KV pools (block counts differ), registered by two agents as the engine would — the pool's
    segment, or the engine's own per-layer tensors as the parts of one region: blocks pushed by
    `kv_block_entries` land exactly where torch indexing says. A destination in shared memory is reached
    through it, one in private tensors over TCP."""
    src_layout, dst_layout = (
        KVPoolLayout(layout=layout, num_blocks=6),
        KVPoolLayout(layout=layout, num_blocks=9),
    )
    src = allocate_kv_pool(src_layout)
    dst = allocate_kv_pool(dst_layout) if dst_in_shm else None
    dst_caches = (
        dst.kv_caches
        if dst is not None
        else [
            (
                torch.zeros(dst_layout.tensor_shape, dtype=torch.bfloat16),
                torch.zeros(dst_layout.tensor_shape, dtype=torch.bfloat16),
            )
            for _ in range(layout.num_layers)
        ]
    )
    try:
        for i, (k, v) in enumerate(src.kv_caches):
            k.copy_(torch.randn(k.shape, generator=torch.Generator().manual_seed(i)))
            v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(100 + i)))
        with TransferAgent("prefill", layout) as a, TransferAgent("decode", layout) as b:
            a.register("kv", [t for kv in src.kv_caches for t in kv])  # the engine's own tensors as parts
            b.register("kv", dst.segment if dst is not None else [t for kv in dst_caches for t in kv])
            peer = a.connect(b.address)
            assert peer.backend is (Backend.SHM if dst_in_shm else Backend.TCP)
            peer_pool = KVPoolLayout.for_region(layout, peer.regions["kv"].size)
            assert peer_pool == dst_layout
            entries = kv_block_entries(src_layout, "kv", [4, 1, 2], peer_pool, "kv", [0, 7, 8])
            a.write(peer, entries).wait(20.0)
        for (sk, sv), (dk, dv) in zip(src.kv_caches, dst_caches, strict=True):
            for s, d in ((sk, dk), (sv, dv)):
                assert torch.equal(d[:, [0, 7, 8]], s[:, [4, 1, 2]])
                assert not d[:, 1:7].any()
    finally:
        src.close()
        if dst is not None:
            dst.close()


def test_sweep_unlinks_the_segments_of_dead_owners_only():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=orphan_segment, args=(child,), daemon=True)  # a child without torch: quick
    proc.start()
    assert parent.poll(30.0)
    name = parent.recv()
    mine = allocate_shared(4096, "alive")
    try:
        proc.kill()
        proc.join(30.0)
        assert name in shm.list_segments()
        removed = shm.sweep_orphans()
        assert name in removed
        assert name not in shm.list_segments()
        assert mine.name in shm.list_segments()  # a live owner's segment stays
    finally:
        mine.close()
