"""The JE's global prompt tree (paper §5.2): which TE of a group holds the KV cache of which prompt prefix.

A TE's local radix tree caches KV in blocks of `block_size` tokens. Each cached block is named by a *chained
block hash*: the hash of its parent block's hash and its own token ids, where the parent of a prompt's first
block is a root hash derived from the namespace (the request's `cache_salt`). A hash therefore names a whole
prefix inside one namespace, exactly as vLLM's KV events do, and the TE and the JE compute it with the same
`hash_blocks`.

The TE reports what it caches with three events (msgspec structs, a tagged union, cheap to emit from a radix
tree: one `BlockStored` per newly inserted run of blocks, one `BlockRemoved` per eviction):

- `BlockStored(te_id, namespace, parent_block_hash, block_hashes, token_ids)`
- `BlockRemoved(te_id, block_hashes)`
- `AllCleared(te_id)`

Since a hash names its whole prefix, the global tree is a block trie stored as a flat map `hash -> holders`:
the child of a node for the next block of a prompt is found by hashing, not by a pointer. A node lives only
while some TE holds it (memory is bounded by what the TEs report holding), and a TE's longest match is the
longest run of a prompt's blocks, from the first one, that it holds without a gap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from deepflow.cache.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    hash_blocks,
    iter_block_hashes,
    root_hash,
)

__all__ = [
    "AllCleared",
    "BlockRemoved",
    "BlockStored",
    "GlobalPromptTree",
    "KVEvent",
    "hash_blocks",
    "iter_block_hashes",
    "root_hash",
]


# ------------------------------------------------------------------------------------------------- tree


class GlobalPromptTree:
    """The prompt tree of one TE group, kept in step with its TEs' local trees by their `KVEvent`s."""

    def __init__(self, block_size: int, *, verify_hashes: bool = False) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.verify_hashes = verify_hashes
        self._holders: dict[int, set[str]] = {}  # block hash -> TEs caching it
        self._by_te: dict[str, set[int]] = {}  # TE -> block hashes it caches

    # -- updates

    def apply(self, event: KVEvent) -> None:
        match event:
            case BlockStored():
                self._store(event)
            case BlockRemoved():
                self._remove(event.te_id, event.block_hashes)
            case AllCleared():
                self.remove_te(event.te_id)
            case _:
                raise TypeError(f"not a KV event: {event!r}")

    def apply_all(self, events: Iterable[KVEvent]) -> None:
        for event in events:
            self.apply(event)

    def remove_te(self, te_id: str) -> int:
        """Forget every block of `te_id` (dead, drained or cleared); return how many it held."""
        hashes = self._by_te.pop(te_id, set())
        for h in hashes:
            self._drop_holder(h, te_id)
        return len(hashes)

    def _store(self, ev: BlockStored) -> None:
        if len(ev.token_ids) != len(ev.block_hashes) * self.block_size:
            raise ValueError(
                f"BlockStored from {ev.te_id}: {len(ev.token_ids)} tokens for {len(ev.block_hashes)} blocks "
                f"of {self.block_size}"
            )
        if self.verify_hashes:
            expected = hash_blocks(ev.namespace, ev.token_ids, self.block_size, ev.parent_block_hash)
            if expected != list(ev.block_hashes):
                raise ValueError(f"BlockStored from {ev.te_id}: block hashes do not match its tokens")
        owned = self._by_te.setdefault(ev.te_id, set())
        for h in ev.block_hashes:
            self._holders.setdefault(h, set()).add(ev.te_id)
            owned.add(h)

    def _remove(self, te_id: str, hashes: Iterable[int]) -> None:
        owned = self._by_te.get(te_id)
        if owned is None:
            return
        for h in hashes:
            if h in owned:
                owned.discard(h)
                self._drop_holder(h, te_id)
        if not owned:
            del self._by_te[te_id]

    def _drop_holder(self, h: int, te_id: str) -> None:
        holders = self._holders[h]
        holders.discard(te_id)
        if not holders:  # prune: a node no TE holds is gone
            del self._holders[h]

    # -- queries

    def match(self, namespace: str, token_ids: Sequence[int]) -> dict[str, int]:
        """Longest cached prefix, in tokens, of `token_ids` per TE that holds at least its first block."""
        return self.match_hashes(iter_block_hashes(namespace, token_ids, self.block_size))

    def match_hashes(self, block_hashes: Iterable[int]) -> dict[str, int]:
        """`match` for a prompt whose chained block hashes are already known (hashed lazily is fine)."""
        matched: dict[str, int] = {}
        alive: set[str] = set()  # TEs holding every block so far
        depth = 0
        for h in block_hashes:
            holders = self._holders.get(h)
            if not holders:
                break
            if depth == 0:
                alive = set(holders)
            else:
                for te in alive - holders:
                    matched[te] = depth * self.block_size
                alive &= holders
                if not alive:
                    break
            depth += 1
        for te in alive:
            matched[te] = depth * self.block_size
        return matched

    def num_blocks(self, te_id: str) -> int:
        """How many blocks `te_id` caches according to its events."""
        return len(self._by_te.get(te_id, ()))

    @property
    def te_ids(self) -> frozenset[str]:
        return frozenset(self._by_te)

    def __len__(self) -> int:
        """Number of nodes (distinct cached blocks over all TEs)."""
        return len(self._holders)
