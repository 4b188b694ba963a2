"""The Relational Tensor Cache (paper §4.3, Table 1): the one owner of every KV block, in both memory tiers.

Operations, with Table 1's meaning:
- `alloc_blocks` (prefill): give a request its block table: the blocks of its cached prefix, shared and
  locked, then fresh blocks. A prefix that ends inside a block is copied into a fresh block (copy-on-write),
  so a hit may end mid-block; the caller never matches the last prompt token, whose logits must be computed.
- `append_block` (decode, or a further prefill chunk): grow a request's table.
- `free`: a request is done or preempted; its private blocks return to the pool, its locks are released.
- `copy` (device → host): an evicted node's blocks go to the host tier instead of being dropped.
- `match_by_prefix_tokens` / `match_by_id`: the longest cached prefix in a namespace / of a pinned context.
- `populate` / `query_populate`: copy a match's host blocks back into the device pool asynchronously; the
  request waits until its transfer is reported done.

Requests `commit` the blocks they have computed, which moves them from the request into the radix tree, so
concurrent requests share a prefix as soon as it is computed. Eviction takes least-recently-used unlocked
leaves: the one with the smallest (last access, serial) among those evictable now, from a heap per tier kept
across calls (see `_index`), so an allocation on a full pool costs O(log nodes), not a walk of the tree.

All of this is accounting: the model runner performs the copies this module emits as `BlockTransfer`s, in
order, before it computes the step they were emitted with (so a block may be evicted and reused within one
scheduling pass: its copy-out runs before anything overwrites it).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from deepflow.cache.block_pool import BlockPool
from deepflow.cache.cost_model import PopulateCostModel
from deepflow.cache.events import AllCleared, BlockRemoved, BlockStored, KVEvent, hash_blocks
from deepflow.cache.radix_tree import Node, RadixTree
from deepflow.engine.contexts import ContextLimitError


class BlockTransfer(msgspec.Struct, array_like=True):
    """Copy block `src[i]` to block `dst[i]` in every layer: kind "d2h" (device → host), "h2d", or "d2d"."""

    kind: str
    src: list[int]
    dst: list[int]
    transfer_id: int = 0  # non-zero for populates, whose completion the runner reports back


@dataclass
class PrefixMatch:
    """A lookup's result. Node references are only valid until the next RTC call that changes the tree."""

    namespace: str
    device: list[tuple[Node, int]] = field(default_factory=list)  # (node, blocks of it matched)
    host: list[tuple[Node, int]] = field(default_factory=list)  # continues `device` in the host tier
    partial_src: int | None = None  # device block whose first `partial_tokens` tokens also match
    partial_tokens: int = 0
    pending: int | None = None  # a populate in flight covers the next blocks: wait for it
    block_size: int = 1

    @property
    def num_device_tokens(self) -> int:
        return sum(n for _, n in self.device) * self.block_size + self.partial_tokens

    @property
    def num_host_blocks(self) -> int:
        return sum(n for _, n in self.host)

    @property
    def num_host_tokens(self) -> int:
        return self.num_host_blocks * self.block_size


@dataclass
class _Holding:
    namespace: str
    table: list[int]
    private: set[int]  # blocks only this request uses; the rest belong to the tree
    node: Node | None  # deepest locked node: covers the request's shared prefix
    num_committed: int = 0  # leading blocks of `table` already in the tree
    node_blocks: int = 0  # blocks from the root to the end of `node` (splits keep `node` ending there)
    num_cached_tokens: int = 0


@dataclass
class _Context:
    namespace: str
    node: Node | None
    num_tokens: int
    expires_at: float


@dataclass
class _Populate:
    node: Node
    transfer_id: int
    num_blocks: int


@dataclass
class CacheStats:
    queries_tokens: int = 0
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    partial_hits: int = 0  # hits that ended inside a block (copied on write)
    device_evicted_blocks: int = 0  # left the device pool (to the host tier or dropped)
    host_evicted_blocks: int = 0  # dropped from the host tier
    populates: int = 0
    populate_latencies: list[float] = field(default_factory=list)  # drained by the engine's stats


class RelationalTensorCache:
    def __init__(
        self,
        num_device_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        *,
        enable_prefix_caching: bool = True,
        max_context_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        cost_model: PopulateCostModel | None = None,
        kv_events: bool = False,
    ) -> None:
        """`kv_events`: record cache-residency events (`take_events`) for job executors' prompt trees."""
        if num_device_blocks < 1 or block_size < 1:
            raise ValueError("num_device_blocks and block_size must be >= 1")
        self.block_size = block_size
        self.device = BlockPool(num_device_blocks)
        self.host = BlockPool(num_host_blocks)
        self.tree = RadixTree(block_size)
        self.enable_prefix_caching = enable_prefix_caching
        # Pins are sized by the owner (the engine leaves room for one max-length request beside them, and
        # the scheduler refuses a request that could not fit beside the cap); none unless it says so.
        self.max_context_tokens = max_context_tokens or 0
        self.cost_model = cost_model or PopulateCostModel()
        self.stats = CacheStats()
        self._clock = clock
        self._holdings: dict[str, _Holding] = {}
        self._contexts: dict[str, _Context] = {}
        self._reserved: dict[str, int] = {}  # context id -> tokens, while its prefill runs
        self._populating: dict[str, _Populate] = {}
        self._inflight: dict[int, tuple[float, int]] = {}  # transfer id -> (issued at, blocks)
        self._transfer_ids = itertools.count(1)
        self._transfers: list[BlockTransfer] = []
        self._events: list[KVEvent] | None = [] if kv_events else None
        self._run_targets: set[int] = set()  # blocks written by the last transfer run
        # Blocks committed during this scheduling pass: their K/V is computed in the coming step, after the
        # copies, so they may be shared (attention reads them after each layer writes) but not copied from.
        self._uncomputed: set[int] = set()
        # The eviction index: a min-heap per tier of (last_access, serial, node), kept across calls. Every
        # node evictable from a tier has an entry there (`node.indexed` says which heaps hold one; at most
        # one each), pushed when it may have become evictable (`_index`: unlock to zero, a copy landed, a
        # child gone, a split). Entries are checked when popped: a node no longer evictable is dropped (it
        # is pushed again if it becomes evictable), and an entry older than the node's last access (which
        # only grows) is pushed again with the current one. So the first valid entry popped is exactly the
        # evictable node with the smallest (last_access, serial), the order a fresh heap of all evictable
        # nodes gives.
        self._device_lru: list[tuple[int, int, Node]] = []
        self._host_lru: list[tuple[int, int, Node]] = []
        self._pending_nodes: dict[int, list[Node]] = {}  # transfer id -> nodes it copies into

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.device.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        holding = self._holdings.get(request_id)
        return holding.table if holding is not None else []

    def num_cached_tokens(self, request_id: str) -> int:
        holding = self._holdings.get(request_id)
        return holding.num_cached_tokens if holding is not None else 0

    def num_committed_blocks(self, request_id: str) -> int:
        holding = self._holdings.get(request_id)
        return holding.num_committed if holding is not None else 0

    def owners(self) -> list[str]:
        return list(self._holdings)

    def usage(self) -> float:
        """Fraction of device blocks held by requests or locked (pinned, in use); cached blocks nobody uses
        are reclaimable and do not count."""
        # Every device block is free, private to a request or in a tree node; the locked nodes are the
        # holders' paths to the root, so this walks those paths instead of the whole tree.
        used = sum(len(h.private) for h in self._holdings.values())
        seen: set[int] = set()
        holders = [h.node for h in self._holdings.values()]
        holders += [c.node for c in self._contexts.values()]
        holders += [p.node for p in self._populating.values()]
        for node in holders:
            while node is not None and node.parent is not None and id(node) not in seen:
                seen.add(id(node))
                if node.device is not None:
                    used += len(node.device)
                node = node.parent
        reclaimable = self.device.num_blocks - self.device.num_free - used
        return 1.0 - (self.device.num_free + reclaimable) / self.device.num_blocks

    # ---- lookups -----------------------------------------------------------------------------------------
    def match_by_prefix_tokens(self, namespace: str, token_ids: list[int]) -> PrefixMatch:
        """The longest cached prefix of `token_ids` (callers leave out the token whose logits they need)."""
        match = PrefixMatch(namespace, block_size=self.block_size)
        path, last_full = self.tree.walk(namespace, token_ids)
        for node, used in path:
            if node.pending is not None:
                match.pending = node.pending
                return match
            if node.device is not None and not match.host:
                match.device.append((node, used))
            elif node.host is not None:
                match.host.append((node, used))
            else:  # pragma: no cover - every node lives in at least one tier
                raise AssertionError("radix node in no tier")
        if not match.host:
            self._match_partial(match, token_ids, path, last_full)
        return match

    def match_by_id(self, context_id: str, token_ids: list[int]) -> PrefixMatch | None:
        """The prompt's match in a pinned context's namespace; None when the context is unknown."""
        context = self._contexts.get(context_id)
        if context is None:
            return None
        return self.match_by_prefix_tokens(context.namespace, token_ids)

    def _match_partial(
        self, match: PrefixMatch, token_ids: list[int], path: list[tuple[Node, int]], last_full: Node | None
    ) -> None:
        bs = self.block_size
        pos = match.num_device_tokens
        rest = token_ids[pos : pos + bs]
        if not rest or last_full is None:
            return
        if path and path[-1][1] < path[-1][0].num_blocks(bs):
            node, used = path[-1]
            candidates = [(node, used)]
        else:
            candidates = [(child, 0) for child in last_full.children.values()]
        best = 0
        for node, index in candidates:
            if not node.on_device() or node.device[index] in self._uncomputed:  # type: ignore[index]
                continue
            block = node.key[index * bs : (index + 1) * bs]
            common = 0
            while common < len(rest) and block[common] == rest[common]:
                common += 1
            if common > best:
                best = common
                match.partial_src = node.device[index]  # type: ignore[index]
        match.partial_tokens = best

    # ---- allocation --------------------------------------------------------------------------------------
    def alloc_blocks(
        self, request_id: str, namespace: str, match: PrefixMatch | None, num_tokens: int
    ) -> list[int] | None:
        """A new request's block table covering `num_tokens`, starting with `match`'s device blocks; None
        (nothing held) when the pool cannot supply the rest even after eviction. Call right after the match.
        `namespace` is where the request's own blocks will be committed."""
        assert request_id not in self._holdings, f"{request_id} already holds blocks"
        bs = self.block_size
        shared: list[int] = []
        locked: Node | None = None
        partial_node: Node | None = None
        partial_src: int | None = None
        if match is not None and match.device:
            node, used = match.device[-1]
            if used < node.num_blocks(bs):
                if match.partial_src is not None:
                    partial_node = node  # the split below keeps the tail as `node`
                node = self._split(node, used)
            locked = node
            for entry, used in match.device[:-1]:
                shared.extend(entry.device[:used])  # type: ignore[index]
            shared.extend(node.device)  # type: ignore[arg-type]
        if match is not None and match.partial_src is not None:
            partial_src = match.partial_src
            if partial_node is None:
                partial_node = self._node_of_device_block(match, partial_src)
        self.tree.lock(locked)
        self.tree.lock(partial_node)  # the copy source must survive the eviction below
        fresh = self._allocate_device(self.blocks_for(num_tokens) - len(shared))
        self._unlock(partial_node)
        if fresh is None and partial_node is not None:
            # The locked copy source may be the one block missing (a pool full of pins and this request):
            # give up the partial hit rather than wait for a block that its own lock keeps.
            partial_src = None
            fresh = self._allocate_device(self.blocks_for(num_tokens) - len(shared))
        if fresh is None:
            self._unlock(locked)
            return None
        cached = len(shared) * bs
        if partial_src is not None and fresh:
            self._emit("d2d", [partial_src], [fresh[0]])
            self.stats.partial_hits += 1
            cached += match.partial_tokens  # type: ignore[union-attr]
        table = shared + fresh
        self._holdings[request_id] = _Holding(
            namespace, table, set(fresh), locked, num_cached_tokens=cached, node_blocks=len(shared)
        )
        # Hits are counted in whole blocks, as requests report them (a partial block's tokens would tell
        # a reader of the metrics exactly how much of a prompt another client sent).
        whole = cached // bs * bs
        populate = self._populating.pop(request_id, None)
        if populate is not None:  # the populated blocks are now part of `locked`'s path
            self._unlock(populate.node)
            self.stats.host_hit_tokens += min(populate.num_blocks * bs, whole)
            self.stats.device_hit_tokens += max(whole - populate.num_blocks * bs, 0)
        else:
            self.stats.device_hit_tokens += whole
        return table

    def _node_of_device_block(self, match: PrefixMatch, block: int) -> Node | None:
        parent = match.device[-1][0] if match.device else self.tree.roots.get(match.namespace)
        if parent is None:
            return None
        for child in parent.children.values():
            if child.device and child.device[0] == block:
                return child
        return None

    def append_block(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow a request's table to cover `num_tokens`; return the new block ids, or None (nothing taken)."""
        holding = self._holdings[request_id]
        count = -(-num_tokens // self.block_size) - len(holding.table)
        if count <= 0:  # the common case (a decode inside its last block): nothing to take
            return []
        fresh = self._allocate_device(count)
        if fresh is None:
            return None
        holding.table.extend(fresh)
        holding.private.update(fresh)
        return fresh

    def commit(self, request_id: str, token_ids: list[int], num_computed_tokens: int) -> None:
        """Publish the request's whole computed blocks in the tree (`token_ids`: the ids known so far)."""
        holding = self._holdings.get(request_id)
        if holding is None:
            return
        bs = self.block_size
        full = min(min(len(token_ids), num_computed_tokens) // bs, len(holding.table))
        if full <= holding.num_committed:
            return
        tree = self.tree
        start = holding.node
        resumed = start is not None and start.device is not None and 0 < holding.node_blocks <= full
        if resumed:
            # Resume at the deepest locked node instead of matching the path again from the root: the path
            # above it is the request's own prefix, on the device (a device node's parent is), each node of
            # it matched in full, so a walk from the root would only touch each of them, root first. Do
            # exactly that (`tree.tick()` inlined), so that the LRU order stays what the walk gives.
            chain: list[Node] = []
            while start.parent is not None:
                chain.append(start)
                start = start.parent
            clock = tree._clock
            for above in reversed(chain):
                clock += 1
                above.last_access = clock
            tree._clock = clock
            node = holding.node
            pos = holding.node_blocks
        else:
            node = tree.root(holding.namespace)
            pos = 0
        while pos < full:
            child = node.children.get(tree.first_block(token_ids, pos * bs))
            if child is None:
                blocks = holding.table[pos:full]
                parent = node
                node = tree.add_child(node, tuple(token_ids[pos * bs : full * bs]), blocks)
                self._stored(parent, node, holding.namespace)
                holding.private.difference_update(blocks)
                self._uncomputed.update(blocks)
                self._index(node)
                break
            used = tree.matched_blocks(child, token_ids, pos * bs, full - pos)
            if used < child.num_blocks(bs):
                child = self._split(child, used)
            if child.device is None:  # host-only: our freshly computed blocks bring it back to the device
                ids = holding.table[pos : pos + used]
                if holding.private.issuperset(ids):
                    child.device = ids
                    holding.private.difference_update(ids)
                    self._uncomputed.update(ids)
                    self._index(child)
            child.last_access = tree.tick()
            node = child
            pos += used
        if resumed:
            # `node` is at or below the old lock: locking it and unlocking the old one adds one to the nodes
            # between them and leaves the rest of the path as it was (never at zero in between).
            old = holding.node
            below = node
            while below is not old:
                below.lock_ref += 1
                below = below.parent
        else:
            tree.lock(node)
            self._unlock(holding.node)
        holding.node = node
        holding.node_blocks = full
        holding.num_committed = full

    def free(self, request_id: str) -> None:
        """Everything the request holds goes back: private blocks to the pool, locks released."""
        self.cancel_populate(request_id)
        holding = self._holdings.pop(request_id, None)
        if holding is None:
            return
        self._unlock(holding.node)
        self.device.free(sorted(holding.private))

    # ---- host tier -----------------------------------------------------------------------------------
    def should_populate(self, match: PrefixMatch) -> bool:
        if not match.host:
            return False
        return self.cost_model.should_populate(match.num_host_tokens, match.num_host_blocks)

    def populate(self, request_id: str, match: PrefixMatch) -> bool:
        """Start copying `match`'s host blocks into fresh device blocks; False (nothing done) if the device
        pool cannot take them. The request then waits until `query_populate` says its copy is done."""
        assert match.host and request_id not in self._populating
        bs = self.block_size
        entries = list(match.host)
        node, used = entries[-1]
        if used < node.num_blocks(bs):
            entries[-1] = (self._split(node, used), used)
        target = entries[-1][0]
        self.tree.lock(target)
        count = sum(used for _, used in entries)
        fresh = self._allocate_device(count)
        if fresh is None:
            self._unlock(target)
            return False
        transfer_id = next(self._transfer_ids)
        src: list[int] = []
        offset = 0
        for entry, used in entries:
            entry.device = fresh[offset : offset + used]
            entry.pending = transfer_id
            src.extend(entry.host)  # type: ignore[arg-type]
            offset += used
        self._emit("h2d", src, fresh, transfer_id)
        self._inflight[transfer_id] = (self._clock(), count)
        self._pending_nodes[transfer_id] = [entry for entry, _ in entries]
        self._populating[request_id] = _Populate(target, transfer_id, count)
        self.stats.populates += 1
        return True

    def cancel_populate(self, request_id: str) -> None:
        """A waiting request gives up the blocks of its populate: they stay cached (evictable once the copy
        has landed), and its next match finds them on the device if nobody evicted them meanwhile."""
        populate = self._populating.pop(request_id, None)
        if populate is not None:
            self._unlock(populate.node)

    def query_populate(self, request_id: str) -> bool:
        """True when the request has no populate in flight (never started one, or its copy is done)."""
        populate = self._populating.get(request_id)
        return populate is None or populate.transfer_id not in self._inflight

    def is_populating(self, request_id: str) -> bool:
        return request_id in self._populating

    def transfers_done(self, transfer_ids: list[int]) -> None:
        now = self._clock()
        done = set()
        for transfer_id in transfer_ids:
            issued = self._inflight.pop(transfer_id, None)
            if issued is None:
                continue
            done.add(transfer_id)
            self.stats.populate_latencies.append(now - issued[0])
        for transfer_id in done:
            # The nodes the copy landed in (and heads split off them since), not a walk of the tree; some
            # may have been dropped meanwhile (`reset`), which is harmless.
            for node in self._pending_nodes.pop(transfer_id, ()):
                if node.pending == transfer_id:
                    node.pending = None
                    self._index(node)

    def observe_step(self, num_tokens: int, seconds: float, copied_blocks: int, copy_seconds: float) -> None:
        self.cost_model.observe_step(num_tokens, seconds)
        self.cost_model.observe_copy(copied_blocks, copy_seconds)

    def take_transfers(self) -> list[BlockTransfer]:
        """The copies emitted since the last call, in order; ends the scheduling pass."""
        transfers, self._transfers = self._transfers, []
        if self._run_targets:  # (a fresh set only when there was something: this runs every step)
            self._run_targets = set()
        if self._uncomputed:
            self._uncomputed = set()
        return transfers

    def take_events(self) -> list[KVEvent]:
        """Residency changes since the last call (empty unless `kv_events`); `te_id` is left for the TE."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def residency_snapshot(self) -> list[KVEvent]:
        """Everything cached now, as events a fresh prompt tree can replay (a job executor that (re)joins):
        AllCleared, then each cached node after its parent."""
        if self._events is None:
            return []
        events: list[KVEvent] = [AllCleared("")]
        for namespace, root in self.tree.roots.items():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                if not node.hashes:
                    continue  # not (yet) cached: nor is anything below it
                parent = node.parent
                parent_hash = parent.hashes[-1] if parent is not None and parent.hashes else None
                events.append(BlockStored("", namespace, parent_hash, list(node.hashes), list(node.key)))
                stack.extend(node.children.values())
        return events

    def _stored(self, parent: Node, node: Node, namespace: str) -> None:
        if self._events is None:
            return
        parent_hash = parent.hashes[-1] if parent.hashes else None
        node.hashes = hash_blocks(namespace, node.key, self.block_size, parent_hash)
        self._events.append(BlockStored("", namespace, parent_hash, list(node.hashes), list(node.key)))

    def _removed(self, node: Node) -> None:
        if self._events is not None and node.hashes:
            self._events.append(BlockRemoved("", list(node.hashes)))

    def _emit(self, kind: str, src: list[int], dst: list[int], transfer_id: int = 0) -> None:
        # Runs of one kind merge into one batched copy, unless a block would be written twice or read after
        # being written in the run (a block evicted and reused within one pass): order must be kept.
        last = self._transfers[-1] if self._transfers else None
        if (
            last is not None
            and last.kind == kind
            and last.transfer_id == transfer_id
            and self._run_targets.isdisjoint(dst)
            and (kind != "d2d" or self._run_targets.isdisjoint(src))
        ):
            last.src.extend(src)
            last.dst.extend(dst)
        else:
            self._transfers.append(BlockTransfer(kind, list(src), list(dst), transfer_id))
            self._run_targets = set()
        self._run_targets.update(dst)

    # ---- eviction ----------------------------------------------------------------------------------------
    def _allocate_device(self, count: int) -> list[int] | None:
        if count <= 0:
            return []
        if count > self.device.num_free:
            self._evict_device(count - self.device.num_free)
        return self.device.allocate(count)

    def _allocate_host(self, count: int) -> list[int] | None:
        if count > self.host.num_blocks:
            return None
        if count > self.host.num_free:
            self._evict_host(count - self.host.num_free)
        return self.host.allocate(count)

    @staticmethod
    def _device_evictable(node: Node) -> bool:
        return (
            node.parent is not None
            and node.lock_ref == 0
            and node.on_device()
            and not any(child.device is not None for child in node.children.values())
        )

    @staticmethod
    def _host_evictable(node: Node) -> bool:
        if node.parent is None or node.host is None or node.pending is not None:
            return False
        return node.device is not None or (not node.children and node.lock_ref == 0)

    # The index (see __init__). Bits of `Node.indexed`:
    _IN_DEVICE_LRU = 1
    _IN_HOST_LRU = 2

    def _index(self, node: Node) -> None:
        """Give `node` an entry in each tier's LRU heap it is evictable from and has none in. Called wherever
        a node may become evictable; being called where it did not is harmless."""
        if node.parent is None:  # a root, or a node no longer in the tree
            return
        indexed = node.indexed
        if not indexed & 1 and self._device_evictable(node):
            heapq.heappush(self._device_lru, (node.last_access, node.serial, node))
            indexed |= 1
        if not indexed & 2 and self._host_evictable(node):
            heapq.heappush(self._host_lru, (node.last_access, node.serial, node))
            indexed |= 2
        node.indexed = indexed

    def _unlock(self, node: Node | None) -> None:
        """`RadixTree.unlock`, indexing each node whose last lock goes (it may now be evictable)."""
        while node is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "unbalanced radix tree unlock"
            if node.lock_ref == 0:
                self._index(node)
            node = node.parent

    def _split(self, node: Node, num_blocks: int) -> Node:
        """`RadixTree.split`; the new head may be evictable (host tier) or still being copied into."""
        head = self.tree.split(node, num_blocks)
        if head.pending is not None:
            self._pending_nodes[head.pending].append(head)
        self._index(head)
        return head

    def _compact(self, heap: list[tuple[int, int, Node]], bit: int) -> None:
        """Drop the entries of nodes no longer in the tree, once they outnumber the live nodes: nodes leave
        the tree (dropped subtrees, reset) without their entries being popped."""
        if len(heap) <= 2 * self.tree.num_nodes + 1024:
            return
        kept = []
        for entry in heap:
            if entry[2].parent is not None:
                kept.append(entry)
            else:
                entry[2].indexed &= ~bit
        heapq.heapify(kept)
        heap[:] = kept

    def _evict(
        self,
        count: int,
        heap: list[tuple[int, int, Node]],
        bit: int,
        evictable: Callable[[Node], bool],
        evict: Callable[[Node], None],
    ) -> None:
        """Evict least-recently-used candidates (splitting the last one) until `count` blocks are freed."""
        self._compact(heap, bit)
        pop, push = heapq.heappop, heapq.heappush
        while count > 0 and heap:
            last_access, serial, node = pop(heap)
            node.indexed &= ~bit
            if node.parent is None or not evictable(node):
                continue  # gone, or not evictable now: indexed again when it may be
            if last_access != node.last_access:  # used since it was indexed: it belongs further on
                push(heap, (node.last_access, serial, node))
                node.indexed |= bit
                continue
            size = len(node.key) // self.block_size
            if size > count:
                self._split(node, size - count)  # `node` keeps the tail, which is evicted
                size = count
            parent = node.parent
            evict(node)
            count -= size
            self._index(node)  # moved to the host tier: evictable from there (unless it was removed)
            self._index(parent)  # its last child in this tier may have gone

    def _evict_device(self, count: int) -> None:
        self._evict(
            count, self._device_lru, self._IN_DEVICE_LRU, self._device_evictable, self._evict_device_node
        )

    def _evict_host(self, count: int) -> None:
        self._evict(count, self._host_lru, self._IN_HOST_LRU, self._host_evictable, self._evict_host_node)

    def _evict_device_node(self, node: Node) -> None:
        blocks = node.device
        assert blocks is not None
        if node.host is None and self.host.num_blocks:
            host = self._allocate_host(len(blocks))
            if host is not None:
                self._emit("d2h", blocks, host)  # copy: the node lives on in the host tier
                node.host = host
        node.device = None
        self.device.free(blocks)
        self.stats.device_evicted_blocks += len(blocks)
        if node.host is None:
            self._drop_subtree(node)

    def _evict_host_node(self, node: Node) -> None:
        host = node.host
        assert host is not None
        node.host = None
        self.host.free(host)
        self.stats.host_evicted_blocks += len(host)
        if node.device is None:
            self._removed(node)
            self.tree.remove_leaf(node)

    def _drop_subtree(self, node: Node) -> None:
        """Remove an unlocked node and everything below it from both tiers."""
        for child in list(node.children.values()):
            self._drop_subtree(child)
        if node.device is not None:
            self.device.free(node.device)
            self.stats.device_evicted_blocks += len(node.device)
            node.device = None
        if node.host is not None:
            self.host.free(node.host)
            self.stats.host_evicted_blocks += len(node.host)
            node.host = None
        self._removed(node)
        self.tree.remove_leaf(node)

    def reset(self) -> int:
        """Drop every cached block nobody uses (both tiers); return how many device blocks were freed."""
        before = self.device.num_free
        stack = [child for root in self.tree.roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            if node.lock_ref == 0 and node.pending is None:
                parent = node.parent
                self._drop_subtree(node)
                assert parent is not None
                self._index(parent)  # a child gone: it may be a leaf of a tier now
            else:
                stack.extend(node.children.values())
        return self.device.num_free - before

    # ---- explicit contexts -----------------------------------------------------------------------------
    def reserve_context(self, context_id: str, num_tokens: int) -> None:
        """Claim room under the pinned-token cap before the context's prefill runs."""
        if context_id in self._contexts or context_id in self._reserved:
            raise ValueError(f"context id {context_id!r} is already in use")
        # At least one block each, so that the cap also bounds how many contexts exist.
        tokens = max(num_tokens // self.block_size, 1) * self.block_size
        pinned = self.pinned_context_tokens() + sum(self._reserved.values())
        if pinned + tokens > self.max_context_tokens:
            raise ContextLimitError(
                f"pinning {tokens} more context tokens would exceed the cap of {self.max_context_tokens} "
                f"pinned tokens ({pinned} pinned or reserved); delete contexts or wait for them to expire. "
                "The cap is --max-context-tokens, at most the KV pool minus the longest request "
                "(--max-model-len)"
            )
        self._reserved[context_id] = tokens

    def unreserve_context(self, context_id: str) -> None:
        self._reserved.pop(context_id, None)

    def pin_context(
        self, context_id: str, request_id: str, prompt: list[int], expires_at: float
    ) -> int | None:
        """Pin the whole blocks of `prompt` that the request committed, as `context_id`; return their tokens,
        or None when the context was released while its prefill ran (its reservation is gone)."""
        if self._reserved.pop(context_id, None) is None:
            return None
        holding = self._holdings[request_id]
        bs = self.block_size
        full = min(len(prompt) // bs, holding.num_committed)
        path, _ = self.tree.walk(holding.namespace, prompt[: full * bs])
        node: Node | None = None
        if path:
            node, used = path[-1]
            if used < node.num_blocks(bs):
                node = self._split(node, used)
        self.tree.lock(node)
        tokens = sum(used for _, used in path) * bs
        self._contexts[context_id] = _Context(holding.namespace, node, tokens, expires_at)
        return tokens

    def release_context(self, context_id: str) -> bool:
        self._reserved.pop(context_id, None)
        context = self._contexts.pop(context_id, None)
        if context is None:
            return False
        self._unlock(context.node)
        return True

    def expire_contexts(self, now: float) -> list[str]:
        expired = [cid for cid, ctx in self._contexts.items() if ctx.expires_at <= now]
        for context_id in expired:
            self.release_context(context_id)
        return expired

    def pinned_context_tokens(self) -> int:
        """Tokens counted against the cap (contexts sharing a prefix each count it)."""
        return sum(max(ctx.num_tokens, self.block_size) for ctx in self._contexts.values())

    def contexts(self) -> list[str]:
        return list(self._contexts)

    # ---- invariants (tests) ------------------------------------------------------------------------------
    def check_consistency(self) -> None:
        """Every block is in exactly one place and every lock is accounted for; raises AssertionError."""
        device_owners: list[int] = self.device.free_ids()
        host_owners: list[int] = self.host.free_ids()
        holders: dict[int, int] = {}  # id(node) -> direct locks
        for holding in self._holdings.values():
            device_owners.extend(holding.private)
            if holding.node is not None:
                holders[id(holding.node)] = holders.get(id(holding.node), 0) + 1
        for ctx in self._contexts.values():
            if ctx.node is not None:
                holders[id(ctx.node)] = holders.get(id(ctx.node), 0) + 1
        for populate in self._populating.values():
            holders[id(populate.node)] = holders.get(id(populate.node), 0) + 1

        def expected_locks(node: Node) -> int:
            total = holders.get(id(node), 0) + sum(expected_locks(c) for c in node.children.values())
            assert node.lock_ref == total, f"lock_ref {node.lock_ref} != {total} holders at or below"
            if node.parent is not None:
                bs = self.block_size
                assert len(node.key) % bs == 0 and node.key
                assert node.device is not None or node.host is not None, "node in no tier"
                for blocks in (node.device, node.host):
                    assert blocks is None or len(blocks) == len(node.key) // bs
                if node.device is not None:
                    device_owners.extend(node.device)
                    assert node.parent.device is not None, "device node under a host-only parent"
                if node.host is not None:
                    host_owners.extend(node.host)
            return total

        for root in self.tree.roots.values():
            expected_locks(root)
        self._check_index()
        assert sorted(device_owners) == list(range(self.device.num_blocks)), "device blocks lost or shared"
        assert sorted(host_owners) == list(range(self.host.num_blocks)), "host blocks lost or shared"

    def _check_index(self) -> None:
        """The eviction index against a brute-force recomputation: every node evictable from a tier has
        exactly one entry in its heap, no older than its last access, and `indexed` says which heaps hold
        an entry of each node."""
        nodes = list(self.tree.nodes())
        assert self.tree.num_nodes == len(nodes), f"num_nodes {self.tree.num_nodes} != {len(nodes)}"
        for heap, bit, evictable in (
            (self._device_lru, self._IN_DEVICE_LRU, self._device_evictable),
            (self._host_lru, self._IN_HOST_LRU, self._host_evictable),
        ):
            entries: dict[int, int] = {}
            for last_access, serial, node in heap:
                assert id(node) not in entries, "two entries of one node in an LRU heap"
                entries[id(node)] = last_access
                assert serial == node.serial and last_access <= node.last_access, "entry newer than its node"
                assert node.indexed & bit, "an entry of a node not marked as indexed"
            for node in nodes:
                assert bool(node.indexed & bit) == (id(node) in entries), "indexed bit out of step with heap"
                if evictable(node):
                    assert id(node) in entries, f"evictable node missing from the LRU heap (bit {bit})"
