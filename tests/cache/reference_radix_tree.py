"""The radix tree as it was before the RTC kept an eviction index (frozen copy; the oracle of
tests/cache/test_rtc_index.py). Do not optimise: this is the reference behaviour.

A block-granular radix tree over token ids, one root per namespace (pure logic, no torch).

Each edge holds whole blocks: `key` is a run of `n * block_size` token ids and the node keeps the ids of the
`n` blocks that hold their KV, in the device tier, the host tier or both. Children are keyed by their first
block, so a lookup descends one dictionary access per node. A node is split at a block boundary when a match
or an insert diverges inside it, so that locks and evictions cover exactly the blocks in use.

Locks are reference counts along the path (mini-sglang/SGLang): locking a node adds one to it and to every
ancestor, so a node with `lock_ref == 0` has no user below it and may be evicted once it is a leaf of its
tier.
Tiers keep one invariant that eviction and matching rely on: if a node is on the device, so is its parent.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

Key = tuple[int, ...]


class Node:
    __slots__ = (
        "children",
        "device",
        "hashes",
        "host",
        "key",
        "last_access",
        "lock_ref",
        "namespace",
        "parent",
        "pending",
        "serial",
    )
    _serials = itertools.count()

    def __init__(self, key: Key, parent: Node | None) -> None:
        self.serial = next(Node._serials)  # a deterministic tie-break for LRU order
        self.key = key
        self.parent = parent
        self.children: dict[Key, Node] = {}
        self.device: list[int] | None = None  # device block ids, one per block of `key`
        self.host: list[int] | None = None  # host block ids, one per block of `key`
        self.pending: int | None = None  # populate transfer still copying `device` in: not readable yet
        self.hashes: list[int] | None = None  # chained block hashes, kept when residency events are on
        self.lock_ref = 0
        self.last_access = 0
        self.namespace: str | None = None  # roots only

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def num_blocks(self, block_size: int) -> int:
        return len(self.key) // block_size

    def on_device(self) -> bool:
        return self.device is not None and self.pending is None


class RadixTree:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.roots: dict[str, Node] = {}
        self._clock = 0

    def root(self, namespace: str) -> Node:
        node = self.roots.get(namespace)
        if node is None:
            node = self.roots[namespace] = Node((), None)
            node.device, node.host = [], []
            node.namespace = namespace
        return node

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def first_block(self, tokens: list[int] | Key, start: int) -> Key:
        return tuple(tokens[start : start + self.block_size])

    # ---- walking ---------------------------------------------------------------------------------------
    def walk(self, namespace: str, tokens: list[int]) -> tuple[list[tuple[Node, int]], Node | None]:
        """The nodes matching `tokens` in whole blocks, each with how many of its blocks match, and the last
        node matched in full (where a further, partial match would continue)."""
        bs = self.block_size
        node = self.roots.get(namespace)
        path: list[tuple[Node, int]] = []
        if node is None:
            return path, None
        pos = 0
        now = self.tick()
        while pos + bs <= len(tokens):
            child = node.children.get(self.first_block(tokens, pos))
            if child is None:
                break
            used = 1
            limit = min(child.num_blocks(bs), (len(tokens) - pos) // bs)
            while used < limit and child.key[used * bs : (used + 1) * bs] == tuple(
                tokens[pos + used * bs : pos + (used + 1) * bs]
            ):
                used += 1
            child.last_access = now
            path.append((child, used))
            pos += used * bs
            if used < child.num_blocks(bs):
                break
            node = child
        return path, node

    def split(self, node: Node, num_blocks: int) -> Node:
        """Cut `node` after its first `num_blocks` blocks; return the new head (the tail keeps `node`'s
        identity, children and locks, so references to the deeper part stay valid)."""
        bs = self.block_size
        cut = num_blocks * bs
        assert 0 < cut < len(node.key) and node.parent is not None
        head = Node(node.key[:cut], node.parent)
        head.lock_ref = node.lock_ref
        head.last_access = node.last_access
        head.pending = node.pending
        if node.device is not None:
            head.device, node.device = node.device[:num_blocks], node.device[num_blocks:]
        if node.host is not None:
            head.host, node.host = node.host[:num_blocks], node.host[num_blocks:]
        if node.hashes is not None:
            head.hashes, node.hashes = node.hashes[:num_blocks], node.hashes[num_blocks:]
        node.parent.children[node.key[:bs]] = head
        node.key = node.key[cut:]
        node.parent = head
        head.children[node.key[:bs]] = node
        return head

    def add_child(self, parent: Node, key: Key, device: list[int]) -> Node:
        child = Node(key, parent)
        child.device = device
        child.last_access = self.tick()
        parent.children[key[: self.block_size]] = child
        return child

    def remove_leaf(self, node: Node) -> None:
        """Remove an unlocked leaf; a namespace left empty goes too, so distinct salts cost nothing once
        their blocks are gone (`root()` makes it again on the next commit)."""
        assert not node.children and node.parent is not None and node.lock_ref == 0
        parent = node.parent
        del parent.children[node.key[: self.block_size]]
        node.parent = None
        if parent.parent is None and not parent.children and parent.lock_ref == 0:
            assert parent.namespace is not None
            del self.roots[parent.namespace]

    # ---- locks -----------------------------------------------------------------------------------------
    @staticmethod
    def lock(node: Node | None) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    @staticmethod
    def unlock(node: Node | None) -> None:
        while node is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "unbalanced radix tree unlock"
            node = node.parent

    # ---- inspection ------------------------------------------------------------------------------------
    def nodes(self) -> Iterator[Node]:
        """Every non-root node."""
        stack = [child for root in self.roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    @staticmethod
    def path_tokens(node: Node) -> list[int]:
        parts: list[Key] = []
        while node.parent is not None:
            parts.append(node.key)
            node = node.parent
        return [t for part in reversed(parts) for t in part]
