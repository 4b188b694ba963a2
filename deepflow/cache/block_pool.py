"""KV block accounting: the single owner of which request holds which KV block (pure logic, no torch).

The Relational Tensor Cache (paper Table 1) builds on this: `alloc_blocks` covers both AllocBlocks (prefill)
and AppendBlock (decode), since both just grow a request's block table to cover its tokens; `free` is Free.
Physical memory is the model runner's; it only ever sees block ids handed out here.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def can_alloc(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self.block_table(request_id)) <= len(self._free)

    def alloc_blocks(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the table to hold `num_tokens`; return the new block ids, or None (nothing is taken)."""
        table = self._tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            if not table:
                del self._tables[request_id]
            return None
        new = [self._free.popleft() for _ in range(max(need, 0))]
        table.extend(new)
        return new

    def free(self, request_id: str) -> int:
        """Return every block of the request to the pool; freeing an unknown request is a no-op."""
        table = self._tables.pop(request_id, None)
        if not table:
            return 0
        self._free.extend(table)
        return len(table)

    def owners(self) -> list[str]:
        return list(self._tables)
