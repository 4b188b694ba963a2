"""The compatibility descriptor two agents exchange at link time, and the KV block → byte span helper.

`LayoutDescriptor` is filled by the caller (a TE: its model, dtype and KV geometry); the handshake refuses
a peer whose descriptor differs, naming every field that does. It deliberately leaves out the number of KV
blocks: a prefill TE and a decode TE may hold pools of different sizes and still exchange blocks.

`KVPoolLayout` adds the block count of one pool and fixes the byte layout of a KV region: the per-layer
(K, V) tensors of `ModelRunner.kv_caches`, each [KV heads, blocks, block size, head_dim], laid end to end
in the order K0, V0, K1, V1, … — one shared-memory segment from `allocate_kv_pool`, or the engine's own
tensors registered as the parts of one region. `kv_block_spans` / `kv_block_entries` map block ids to byte
spans of that address space; the data plane itself knows nothing about blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import msgspec

from deepflow.flow.spans import TransferEntry

# Bytes per element of the dtypes a KV pool or weight region may hold (torch's names, without "torch.").
DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


class LayoutDescriptor(msgspec.Struct, frozen=True, kw_only=True):
    """What must agree between two agents before any byte moves between them. `extra` carries anything
    else a caller wants checked (a weights revision, a tensor-parallel rank, …) as strings."""

    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    extra: dict[str, str] = msgspec.field(default_factory=dict)

    def digest(self) -> str:
        """sha256 of the canonical encoding (fields in declaration order, `extra` sorted by key)."""
        canonical = msgspec.structs.replace(self, extra=dict(sorted(self.extra.items())))
        return hashlib.sha256(msgspec.msgpack.encode(canonical)).hexdigest()

    def mismatches(self, other: LayoutDescriptor) -> list[str]:
        """One line per differing field, `name: ours != theirs`; [] when compatible."""
        out = []
        for field in self.__struct_fields__:
            if field == "extra":
                continue
            ours, theirs = getattr(self, field), getattr(other, field)
            if ours != theirs:
                out.append(f"{field}: {ours!r} != {theirs!r}")
        for key in sorted(set(self.extra) | set(other.extra)):
            ours, theirs = self.extra.get(key), other.extra.get(key)
            if ours != theirs:
                out.append(f"extra[{key!r}]: {ours!r} != {theirs!r}")
        return out


class KVPoolLayout(msgspec.Struct, frozen=True, kw_only=True):
    """One KV pool's byte layout: the descriptor's geometry plus its number of blocks."""

    layout: LayoutDescriptor
    num_blocks: int

    @classmethod
    def for_region(cls, layout: LayoutDescriptor, size: int) -> KVPoolLayout:
        """The pool a KV region of `size` bytes holds under `layout` (a peer's, from its `RegionInfo`)."""
        per_block = cls(layout=layout, num_blocks=1).total_bytes
        if size <= 0 or size % per_block:
            raise ValueError(f"a KV region of {size} bytes is not a whole number of {per_block}-byte blocks")
        return cls(layout=layout, num_blocks=size // per_block)

    @property
    def element_size(self) -> int:
        try:
            return DTYPE_SIZES[self.layout.dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {self.layout.dtype!r} (known: {sorted(DTYPE_SIZES)})") from None

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one head of one K or V tensor: the unit a span is made of."""
        return self.layout.block_size * self.layout.head_dim * self.element_size

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one layer's K (or V) tensor."""
        return self.layout.num_kv_heads * self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return 2 * self.layout.num_layers * self.tensor_bytes

    @property
    def tensor_shape(self) -> tuple[int, int, int, int]:
        lay = self.layout
        return (lay.num_kv_heads, self.num_blocks, lay.block_size, lay.head_dim)

    def tensor_offset(self, layer: int, kv: int) -> int:
        """Byte offset of layer `layer`'s K (`kv=0`) or V (`kv=1`) tensor in the region."""
        return (2 * layer + kv) * self.tensor_bytes

    def block_offset(self, layer: int, kv: int, head: int, block: int) -> int:
        return self.tensor_offset(layer, kv) + (head * self.num_blocks + block) * self.block_bytes


def _runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, count) for maximal runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def _check_blocks(pool: KVPoolLayout, block_ids: Iterable[int]) -> None:
    for b in block_ids:
        if not 0 <= b < pool.num_blocks:
            raise ValueError(f"block id {b} outside the pool's {pool.num_blocks} blocks")


def kv_block_spans(
    pool: KVPoolLayout, block_ids: Sequence[int], layers: Iterable[int] | None = None
) -> list[tuple[int, int]]:
    """(offset, length) byte spans of `block_ids` in a KV region of layout `pool`, for every layer (or
    `layers`), K and V, every head; consecutive block ids merged into one span per head."""
    _check_blocks(pool, block_ids)
    runs = _runs(block_ids, block_ids)
    lay = pool.layout
    out = []
    for layer in range(lay.num_layers) if layers is None else layers:
        for kv in (0, 1):
            for head in range(lay.num_kv_heads):
                for start, _, count in runs:
                    out.append((pool.block_offset(layer, kv, head, start), count * pool.block_bytes))
    return out


def kv_block_entries(
    src_pool: KVPoolLayout,
    src_region: str,
    src_blocks: Sequence[int],
    dst_pool: KVPoolLayout,
    dst_region: str,
    dst_blocks: Sequence[int],
    layers: Iterable[int] | None = None,
) -> list[TransferEntry]:
    """Entries copying block `src_blocks[i]` of the source pool to block `dst_blocks[i]` of the destination
    pool (every layer or `layers`, K and V, every head); the pools may differ in block count, not in
    geometry. Runs consecutive on both sides become one entry per head."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks")
    if mismatch := src_pool.layout.mismatches(dst_pool.layout):
        raise ValueError(f"incompatible KV pools: {'; '.join(mismatch)}")
    _check_blocks(src_pool, src_blocks)
    _check_blocks(dst_pool, dst_blocks)
    runs = _runs(src_blocks, dst_blocks)
    lay = src_pool.layout
    size = src_pool.block_bytes
    out = []
    for layer in range(lay.num_layers) if layers is None else layers:
        for kv in (0, 1):
            for head in range(lay.num_kv_heads):
                for s, d, count in runs:
                    out.append(
                        TransferEntry(
                            src_region,
                            src_pool.block_offset(layer, kv, head, s),
                            dst_region,
                            dst_pool.block_offset(layer, kv, head, d),
                            count * size,
                        )
                    )
    return out
