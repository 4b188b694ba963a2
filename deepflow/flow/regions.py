"""Registered memory regions: a name over one or more buffers laid end to end as one byte address space.

A region is what a transfer entry names. Its parts are whatever the caller registers — torch tensors (the
KV pool's per-layer K and V, weights), numpy arrays, bytearrays, mmaps, `ShmSegment`s — viewed as flat uint8
numpy arrays without copies. A part that lies inside a shared-memory segment of this process is described
to peers by the segment's name and offset, so a peer on the same host can map it and copy directly.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from deepflow.flow import shm


class RegionPart(msgspec.Struct, frozen=True, array_like=True):
    """One buffer of a region as a peer sees it: its size and, when it lives in shared memory, where."""

    size: int
    shm_name: str | None = None
    shm_offset: int = 0
    shm_size: int = 0  # the whole segment's size, to map it
    address: int = 0  # the part's virtual address in its owner's process (for one-sided engines: Mooncake)


class RegionInfo(msgspec.Struct, frozen=True):
    """A region as announced in the handshake."""

    name: str
    size: int
    parts: list[RegionPart]

    @property
    def in_shm(self) -> bool:
        return all(p.shm_name is not None for p in self.parts)


def as_bytes(buffer: Any) -> np.ndarray:
    """A flat, writable uint8 numpy view of `buffer` (no copy). Tensors must be contiguous and on the CPU."""
    if isinstance(buffer, shm.ShmSegment):
        return buffer.array
    if hasattr(buffer, "untyped_storage"):  # a torch tensor; torch is imported by whoever made it
        import torch

        if buffer.device.type != "cpu":
            raise ValueError(f"only CPU tensors can be registered, not {buffer.device}")
        if not buffer.is_contiguous():
            raise ValueError("a registered tensor must be contiguous")
        return buffer.detach().reshape(-1).view(torch.uint8).numpy()
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise ValueError("a registered array must be C-contiguous")
        view = buffer.reshape(-1).view(np.uint8)
    else:
        view = np.frombuffer(buffer, dtype=np.uint8)
    if not view.flags.writeable:
        raise ValueError("a registered buffer must be writable")
    return view


class MemoryRegion:
    """A named region: parts as uint8 views, and the map from region offsets to pieces of parts."""

    def __init__(self, name: str, buffers: Sequence[Any]) -> None:
        if not buffers:
            raise ValueError(f"region {name!r} needs at least one buffer")
        self.name = name
        self._keep = list(buffers)  # the caller's objects: the views must not outlive them
        self.parts = [as_bytes(b) for b in buffers]
        self._starts = []
        total = 0
        for p in self.parts:
            self._starts.append(total)
            total += p.size
        self.size = total

    def info(self) -> RegionInfo:
        parts = []
        for p in self.parts:
            found = shm.registry.find(p.ctypes.data, p.size) if p.size else None
            address = p.ctypes.data
            if found is None:
                parts.append(RegionPart(p.size, address=address))
            else:
                seg, offset = found
                parts.append(RegionPart(p.size, seg.name, offset, seg.size, address))
        return RegionInfo(self.name, self.size, parts)

    def pieces(self, offset: int, length: int) -> list[np.ndarray]:
        """The views covering [offset, offset + length), split at part boundaries (bounds checked earlier)."""
        return split(self.parts, self._starts, offset, length)


def split(parts: list[np.ndarray], starts: list[int], offset: int, length: int) -> list[np.ndarray]:
    if len(parts) == 1:  # the common case (one segment, one pool): a slice, no search
        return [parts[0][offset : offset + length]]
    out = []
    i = bisect.bisect(starts, offset) - 1
    while length > 0:
        part = parts[i]
        local = offset - starts[i]
        n = min(length, part.size - local)
        if n > 0:
            out.append(part[local : local + n])
            offset += n
            length -= n
        i += 1
    return out


class PeerRegion:
    """A peer's shared-memory region mapped here: the same offset → pieces map over the attachments."""

    def __init__(self, info: RegionInfo, segments: dict[str, shm.ShmSegment]) -> None:
        self.name = info.name
        self.size = info.size
        self.parts = []
        self._starts = []
        total = 0
        for p in info.parts:
            assert p.shm_name is not None
            seg = segments.get(p.shm_name)
            if seg is None:
                seg = segments[p.shm_name] = shm.ShmSegment.attach(p.shm_name, p.shm_size)
            self.parts.append(seg.array[p.shm_offset : p.shm_offset + p.size])
            self._starts.append(total)
            total += p.size

    def pieces(self, offset: int, length: int) -> list[np.ndarray]:
        return split(self.parts, self._starts, offset, length)


class RemoteAddresses:
    """A peer's region by the addresses of its parts in the peer's process: offset → (address, length)
    pieces, for an engine that moves bytes between registered addresses (Mooncake)."""

    def __init__(self, info: RegionInfo) -> None:
        self.parts = [(p.address, p.size) for p in info.parts]
        self._starts = []
        total = 0
        for _, size in self.parts:
            self._starts.append(total)
            total += size

    def pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        out = []
        i = bisect.bisect(self._starts, offset) - 1
        while length > 0:
            address, size = self.parts[i]
            local = offset - self._starts[i]
            n = min(length, size - local)
            if n > 0:
                out.append((address + local, n))
                offset += n
                length -= n
            i += 1
        return out
