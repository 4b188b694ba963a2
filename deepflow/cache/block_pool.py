"""Free list of one memory tier's physical KV blocks (pure logic, no torch).

Only the Relational Tensor Cache (`deepflow.cache.rtc`) takes blocks from and returns blocks to a pool; the
model runner only ever sees the ids it hands out.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` block ids, or None (nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)

    def free_ids(self) -> list[int]:
        return list(self._free)
