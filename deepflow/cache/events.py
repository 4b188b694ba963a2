"""Cache-residency events: what a task executor's Relational Tensor Cache reports so that job executors can
route by locality (paper §5.2). The cache produces them; the JE's `GlobalPromptTree` consumes them.

Each cached block is named by a *chained block hash*: the hash of its parent block's hash and its own token
ids, where the parent of a prompt's first block is a root hash derived from the namespace (the request's
`cache_salt`). A hash therefore names a whole prefix inside one namespace, as vLLM's KV events do, and both
sides compute it with `hash_blocks`. Removal is reported when a block leaves the cache altogether (a block
moved to the host tier is still cached: a hit there is far cheaper than recomputing).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from functools import lru_cache

import msgspec

# ---------------------------------------------------------------------------------------------- hashing


_BIG_ENDIAN = sys.byteorder == "big"
assert array("q").itemsize == 8


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@lru_cache(maxsize=64)
def _block_struct(block_size: int) -> struct.Struct:
    # parent hash (u64) followed by the block's token ids (i64), little-endian: stable across platforms.
    return struct.Struct(f"<Q{block_size}q")


@lru_cache(maxsize=1024)
def root_hash(namespace: str) -> int:
    """The parent hash of a prompt's first block in `namespace` (different salts never share blocks)."""
    return _digest(b"deepflow-prompt-root\x00" + namespace.encode())


def iter_block_hashes(
    namespace: str, token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> Iterator[int]:
    """Lazily yield the chained hash of each whole block of `token_ids` (a trailing partial block is skipped).

    `parent_hash` continues a chain (the hash of the block just before `token_ids`); None starts at the root.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    h = root_hash(namespace) if parent_hash is None else parent_hash
    step = 8 * block_size
    end = len(token_ids) // block_size * step
    if not end:
        return
    # The bytes `_block_struct` packs (the parent's u64, then the block's i64s, little-endian), with every
    # token packed at once instead of one struct call per block: this runs for every block a TE caches and
    # every prompt a JE routes.
    tokens = array("q", token_ids[: end // 8])
    if _BIG_ENDIAN:
        tokens.byteswap()
    data = tokens.tobytes()
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for start in range(0, end, step):
        h = from_bytes(
            blake2b(h.to_bytes(8, "little") + data[start : start + step], digest_size=8).digest(), "little"
        )
        yield h


def hash_blocks(
    namespace: str, token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """The chained hashes of the whole blocks of `token_ids` (see `iter_block_hashes`)."""
    return list(iter_block_hashes(namespace, token_ids, block_size, parent_hash))


# ----------------------------------------------------------------------------------------------- events


class BlockStored(msgspec.Struct, frozen=True, tag="stored"):
    """`te_id` now caches the blocks `block_hashes`, the continuation of `parent_block_hash` (None: the root).

    `token_ids` holds the blocks' tokens (`len(block_hashes) * block_size` of them), as in vLLM's event; the
    tree only needs them to verify the hashes (`GlobalPromptTree(verify_hashes=True)`).
    """

    te_id: str
    namespace: str
    parent_block_hash: int | None
    block_hashes: list[int]
    token_ids: list[int]

    @classmethod
    def of(
        cls,
        te_id: str,
        namespace: str,
        token_ids: Sequence[int],
        block_size: int,
        parent_block_hash: int | None = None,
    ) -> BlockStored:
        """The event for caching the whole blocks of `token_ids` after `parent_block_hash` (TE side)."""
        hashes = hash_blocks(namespace, token_ids, block_size, parent_block_hash)
        return cls(te_id, namespace, parent_block_hash, hashes, list(token_ids[: len(hashes) * block_size]))


class BlockRemoved(msgspec.Struct, frozen=True, tag="removed"):
    """`te_id` evicted the blocks `block_hashes`."""

    te_id: str
    block_hashes: list[int]


class AllCleared(msgspec.Struct, frozen=True, tag="cleared"):
    """`te_id` dropped its whole cache (restart, cache reset)."""

    te_id: str


KVEvent = BlockStored | BlockRemoved | AllCleared
"""What a TE publishes; decode with `msgspec.msgpack.Decoder(list[KVEvent])`."""
