"""Shared-memory segments: pre-faulted, viewed as torch tensors, unlinked on close, orphans swept."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import torch

from deepflow.flow import (
    KVPoolLayout,
    TransferAgent,
    allocate_kv_pool,
    allocate_shared,
    kv_block_entries,
    shm,
)


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


def test_engine_pools_exchange_blocks_over_shm(layout):
    """Two KV pools in shared memory (block counts differ), registered by two agents: blocks pushed by
    `kv_block_entries` land exactly where torch indexing says."""
    src_layout, dst_layout = (
        KVPoolLayout(layout=layout, num_blocks=6),
        KVPoolLayout(layout=layout, num_blocks=9),
    )
    src, dst = allocate_kv_pool(src_layout), allocate_kv_pool(dst_layout)
    try:
        for i, (k, v) in enumerate(src.kv_caches):
            k.copy_(torch.randn(k.shape, generator=torch.Generator().manual_seed(i)))
            v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(100 + i)))
        with TransferAgent("prefill", layout) as a, TransferAgent("decode", layout) as b:
            a.register("kv", [t for kv in src.kv_caches for t in kv])  # the engine's own tensors as parts
            b.register("kv", dst.segment)
            peer = a.connect(b.address)
            assert peer.backend.value == "shm"
            entries = kv_block_entries(src_layout, "kv", [4, 1, 2], dst_layout, "kv", [0, 7, 8])
            a.write(peer, entries).wait(20.0)
        for (sk, sv), (dk, dv) in zip(src.kv_caches, dst.kv_caches, strict=True):
            for s, d in ((sk, dk), (sv, dv)):
                assert torch.equal(d[:, [0, 7, 8]], s[:, [4, 1, 2]])
                assert not d[:, 1:7].any()
    finally:
        src.close()
        dst.close()


def _orphan(conn) -> None:
    seg = allocate_shared(4096, "orphan")
    conn.send(seg.name)
    conn.recv()  # killed here, never closing the segment


def test_sweep_unlinks_the_segments_of_dead_owners_only():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_orphan, args=(child,), daemon=True)
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
