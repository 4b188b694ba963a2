"""DistFlow (paper §4.4): peer-to-peer tensor transfer between TEs, Mooncake-transfer-engine shaped.

Control plane: a `TransferAgent` per process registers memory regions and links to peers (a handshake that
checks a `LayoutDescriptor` both ways and learns the peer's incarnation and regions). Data plane:
`transfer` of a batch of `TransferEntry`s (bytes between region offsets), asynchronous, a `TransferHandle`
back. Backends: shared memory on one host (`allocate_kv_pool` puts an engine's KV pool in /dev/shm, peers
copy straight into it) and TCP across hosts. `kv_block_spans` / `kv_block_entries` map KV block ids to byte
spans; the data plane itself knows nothing about blocks.
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
