"""DistFlow (paper §4.4): peer-to-peer tensor transfer between TEs, Mooncake-transfer-engine shaped.

Control plane: a `TransferAgent` per process registers memory regions and links to peers (a handshake that
checks a `LayoutDescriptor` both ways and learns the peer's incarnation and regions). Data plane:
`transfer` of a batch of `TransferEntry`s (bytes between region offsets), asynchronous, a `TransferHandle`
back. Backends: shared memory on one host (`allocate_kv_pool` puts an engine's KV pool in /dev/shm, peers
copy straight into it) and TCP across hosts. `kv_block_spans` / `kv_block_entries` map KV block ids to byte
spans; the data plane itself knows nothing about blocks.

    from deepflow.flow import (KVPoolLayout, LayoutDescriptor, TransferAgent, allocate_kv_pool,
                               kv_block_entries)

    layout = LayoutDescriptor(model_id="smollm2-135m", dtype="bfloat16", num_layers=30, num_kv_heads=3,
                              head_dim=64, block_size=16)
    mine = KVPoolLayout(layout=layout, num_blocks=1024)
    pool = allocate_kv_pool(mine)                   # pool.kv_caches: the engine's [(K, V)] per layer
    agent = TransferAgent("prefill-0", layout)
    agent.register("kv", pool.segment)
    peer = agent.connect(decode_address)            # shm on one host, else TCP; LayoutMismatchError
    theirs = KVPoolLayout.for_region(layout, peer.regions["kv"].size)
    entries = kv_block_entries(mine, "kv", [3, 4, 9], theirs, "kv", [17, 18, 2])
    handle = agent.write(peer, entries, tag=request_id)   # the decode side's on_receive sees the tag
    handle.wait(timeout=5.0)                        # or poll(); raises on failure, timeout, restart
    ...
    agent.close(); pool.close()                     # close unlinks the pool's /dev/shm segment

The contract:
- completion (DONE) means the peer incarnation the transfer was bound to has the bytes (writes) or they
  are here (reads), and its `on_receive` ran; transfers on one link complete in submission order;
- a batch is checked before any byte moves (`InvalidTransferError`): regions, bounds, no overlapping
  destinations; the peer checks again against its current regions (`TransferRejectedError`);
- every transfer has a deadline (default 30 s); waits take a bound; a silent peer fails its link at the
  deadline (`TransferTimeoutError`), a closed connection at once (`PeerLostError`), a new incarnation of
  the peer — seen by `connect` or by the peer linking to us — voids the old link (`PeerRestartedError`);
- memory: CPU only (torch tensors, numpy arrays, buffers, shm segments); regions are announced at link
  time (a peer sees later ones after reconnecting); the owner unlinks its segments on close, a crashed
  owner's are removed by `sweep_orphans()`.
"""

from deepflow.flow.agent import TransferAgent
from deepflow.flow.errors import (
    FlowError,
    InvalidTransferError,
    LayoutMismatchError,
    PeerLostError,
    PeerRestartedError,
    TransferRejectedError,
    TransferTimeoutError,
)
from deepflow.flow.handle import TransferHandle, TransferOp, TransferState, wait_all
from deepflow.flow.layout import KVPoolLayout, LayoutDescriptor, kv_block_entries, kv_block_spans
from deepflow.flow.link import Backend, LinkState, PeerInfo
from deepflow.flow.regions import RegionInfo, RegionPart
from deepflow.flow.shm import SharedKVPool, ShmSegment, allocate_kv_pool, allocate_shared, sweep_orphans
from deepflow.flow.spans import Span, TransferEntry, coalesce
from deepflow.flow.target import InboundTransfer

__all__ = [
    "Backend",
    "FlowError",
    "InboundTransfer",
    "InvalidTransferError",
    "KVPoolLayout",
    "LayoutDescriptor",
    "LayoutMismatchError",
    "LinkState",
    "PeerInfo",
    "PeerLostError",
    "PeerRestartedError",
    "RegionInfo",
    "RegionPart",
    "SharedKVPool",
    "ShmSegment",
    "Span",
    "TransferAgent",
    "TransferEntry",
    "TransferHandle",
    "TransferOp",
    "TransferRejectedError",
    "TransferState",
    "TransferTimeoutError",
    "allocate_kv_pool",
    "allocate_shared",
    "coalesce",
    "kv_block_entries",
    "kv_block_spans",
    "sweep_orphans",
    "wait_all",
]
