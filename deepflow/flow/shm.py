"""Shared-memory segments on one host: named files in /dev/shm, mapped with mmap.

A segment is created by its owner (the agent or engine that allocates a KV pool in it), pre-faulted once
(`posix_fallocate` takes the pages now — a /dev/shm too small fails here with ENOSPC, not with a SIGBUS
under load — and `MAP_POPULATE` maps them), and viewed as numpy or torch tensors without copies. A peer on
the same host attaches it by name and copies straight into (or out of) it.

Unlink policy: the owner unlinks its segments on `close()`; a peer's attachment only unmaps. A process
that dies without closing leaves its files behind (the pages stay allocated until unlinked): every name
carries the owner's pid (`deepflow-flow.<pid>.<tag>.<token>`), and `sweep_orphans()` removes the segments
whose owner is no longer alive — the cluster manager (or the restarted TE) calls it. Mappings stay valid
for whoever still has them after an unlink, so a peer that is mid-copy never faults.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import secrets
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from deepflow.flow.layout import KVPoolLayout

if TYPE_CHECKING:
    import torch

SHM_DIR = "/dev/shm"
PREFIX = "deepflow-flow"


class _Registry:
    """Every segment mapped in this process by base address, so a registered buffer (a torch view of a
    segment, say) is found to live in shared memory and offered to same-host peers by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._segments: list[ShmSegment] = []

    def add(self, seg: ShmSegment) -> None:
        with self._lock:
            i = bisect.bisect(self._starts, seg.address)
            self._starts.insert(i, seg.address)
            self._segments.insert(i, seg)

    def remove(self, seg: ShmSegment) -> None:
        with self._lock:
            for i, s in enumerate(self._segments):
                if s is seg:
                    del self._starts[i], self._segments[i]
                    return

    def find(self, address: int, size: int) -> tuple[ShmSegment, int] | None:
        """The owned segment holding [address, address + size) and the offset into it, or None."""
        with self._lock:
            i = bisect.bisect(self._starts, address) - 1
            if i < 0:
                return None
            seg = self._segments[i]
        offset = address - seg.address
        if seg.owner and offset + size <= seg.size:
            return seg, offset
        return None


registry = _Registry()


class ShmSegment:
    """One named shared-memory segment mapped into this process; `array` is its uint8 view."""

    def __init__(self, name: str, size: int, fd: int, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        self.array: np.ndarray = np.frombuffer(self._mm, dtype=np.uint8)
        self.address: int = self.array.ctypes.data
        self.closed = False
        registry.add(self)

    @classmethod
    def create(cls, size: int, tag: str = "seg") -> ShmSegment:
        """A new zero-filled segment of `size` bytes owned by this process (unlinked by `close`)."""
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        name = f"{PREFIX}.{os.getpid()}.{tag}.{secrets.token_hex(4)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        try:
            return cls(name, size, fd, owner=True)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, name: str, size: int) -> ShmSegment:
        """Map a peer's segment (read-write); `close` unmaps, never unlinks."""
        if "/" in name or not name.startswith(PREFIX):
            raise ValueError(f"not a DistFlow segment name: {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        return cls(name, size, fd, owner=False)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        """A torch tensor viewing `shape` elements of `dtype` at byte `offset` (no copy). Made from the
        numpy view, which holds a buffer export of the mapping (`torch.frombuffer` does not): while any such
        tensor lives the mapping cannot be closed under it."""
        import math

        import torch

        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"{nbytes} bytes at {offset} exceed the segment's {self.size}")
        return torch.from_numpy(self.array[offset : offset + nbytes]).view(dtype).view(shape)

    def close(self) -> None:
        """Unlink (the owner) and unmap. Views still alive keep the memory mapped until they are dropped
        (the mapping cannot be closed under them); the name is gone at once either way."""
        if self.closed:
            return
        self.closed = True
        registry.remove(self)
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))
        self.array = np.empty(0, dtype=np.uint8)
        try:
            if self._mm is not None:
                self._mm.close()
        except BufferError:
            pass  # exported views (tensors) alive: unmapped when the last one is collected
        self._mm = None

    def __enter__(self) -> ShmSegment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShmSegment({self.name!r}, {self.size}, owner={self.owner})"


def allocate_shared(size: int, tag: str = "seg") -> ShmSegment:
    """A pre-faulted shared-memory segment of `size` bytes, owned (and unlinked on close) by the caller."""
    return ShmSegment.create(size, tag)


class SharedKVPool:
    """A KV pool in one shared-memory segment: `kv_caches` is the engine's per-layer (K, V) list, each
    tensor [KV heads, blocks, block size, head_dim] viewing the segment in the K0, V0, K1, V1, … order that
    `kv_block_spans` assumes. Register `segment` (or the tensors) as the KV region."""

    def __init__(self, pool: KVPoolLayout, tag: str = "kv") -> None:
        import torch

        self.pool = pool
        self.segment = ShmSegment.create(pool.total_bytes, tag)
        dtype = getattr(torch, pool.layout.dtype)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                self.segment.tensor(dtype, pool.tensor_shape, pool.tensor_offset(layer, 0)),
                self.segment.tensor(dtype, pool.tensor_shape, pool.tensor_offset(layer, 1)),
            )
            for layer in range(pool.layout.num_layers)
        ]

    def close(self) -> None:
        self.kv_caches = []
        self.segment.close()


def allocate_kv_pool(pool: KVPoolLayout, tag: str = "kv") -> SharedKVPool:
    """The engine's KV pool in shared memory (zeroed, pre-faulted), for `ModelRunner.kv_caches`."""
    return SharedKVPool(pool, tag)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_segments(pid: int | None = None) -> list[str]:
    """Names of the DistFlow segments in /dev/shm (of owner `pid` if given)."""
    out = []
    for name in os.listdir(SHM_DIR):
        parts = name.split(".")
        ours = len(parts) >= 4 and parts[0] == PREFIX and parts[1].isdigit()
        if ours and (pid is None or int(parts[1]) == pid):
            out.append(name)
    return sorted(out)


def sweep_orphans() -> list[str]:
    """Unlink the segments whose owner process is gone (a crash skipped its `close`); returns their names.
    A pid reused by an unrelated process keeps its orphan until that process ends too."""
    removed = []
    for name in list_segments():
        if not _pid_alive(int(name.split(".")[1])):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
