"""The chained block hashes against their definition (one struct per block): TEs and JEs must agree."""

from __future__ import annotations

import hashlib
import struct

from hypothesis import example, given
from hypothesis import strategies as st

from deepflow.cache.events import hash_blocks, root_hash


def reference(namespace: str, tokens: list[int], block_size: int, parent: int | None = None) -> list[int]:
    pack = struct.Struct(f"<Q{block_size}q").pack
    h = root_hash(namespace) if parent is None else parent
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = int.from_bytes(
            hashlib.blake2b(pack(h, *tokens[start : start + block_size]), digest_size=8).digest(), "little"
        )
        out.append(h)
    return out


@given(
    namespace=st.text(max_size=8),
    tokens=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=70),
    block_size=st.integers(1, 17),
    parent=st.none() | st.integers(0, 2**64 - 1),
)
@example(namespace="", tokens=[], block_size=4, parent=None)
@example(namespace="s", tokens=[1, 2, 3], block_size=4, parent=None)  # no whole block
def test_hash_blocks_matches_the_packed_definition(namespace, tokens, block_size, parent) -> None:
    assert hash_blocks(namespace, tokens, block_size, parent) == reference(
        namespace, tokens, block_size, parent
    )
    assert hash_blocks(namespace, tuple(tokens), block_size, parent) == reference(
        namespace, tokens, block_size, parent
    )
