"""DRAM pre-loading (paper §6.2): a model's weight files in the page cache before a TE needs them.

Weights are safetensors read through mmap, so a TE's TE-Load step costs a page-cache copy when the files are
resident (a *DRAM hit*) and a storage read when not (a *DRAM miss*). This module measures residency
(`mincore` over a read-only mapping: what the kernel really holds, not what we assume), pre-loads files
(`posix_fadvise(WILLNEED)` to start the readahead, then a sequential read into one reused buffer so the
pages are certainly there when it returns) and evicts them (`posix_fadvise(DONTNEED)`, for measuring a
cold start honestly: never assume a cache is cold).

Linux only for `mincore`; elsewhere residency is unknown (None) and pre-loading still reads the files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PreloadResult", "Residency", "evict", "model_files", "preload", "residency"]

_CHUNK = 8 << 20
_PAGE = mmap.PAGESIZE


def model_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files a TE reads to load a model from `folder`: weights first, then config and tokenizer."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    extra = [folder / n for n in ("model.safetensors.index.json", "config.json", "tokenizer.json")]
    return weights + [p for p in extra if p.is_file()]


@dataclass(frozen=True)
class Residency:
    total_bytes: int
    resident_bytes: int | None  # None where mincore is unavailable

    @property
    def fraction(self) -> float | None:
        if self.resident_bytes is None:
            return None
        return 1.0 if self.total_bytes == 0 else self.resident_bytes / self.total_bytes

    def is_hit(self, threshold: float = 0.99) -> bool | None:
        """A DRAM hit: (almost) every page resident."""
        f = self.fraction
        return None if f is None else f >= threshold


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if not all(hasattr(libc, f) for f in ("mincore", "mmap", "munmap")):
        return None
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.mincore.restype = ctypes.c_int
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    return libc


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def _resident_bytes(path: Path, size: int) -> int | None:
    """mincore over a fresh read-only mapping: mapping a file does not fault its pages in, so this reads
    the page cache without changing it. (Python's mmap object hides its address for read-only maps, hence
    libc's mmap.)"""
    if _LIBC is None:
        return None
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap({path}): {os.strerror(err)}")
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore({path}): {os.strerror(err)}")
        finally:
            _LIBC.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    resident_pages = sum(1 for b in bytes(vec) if b & 1)
    return min(size, resident_pages * _PAGE)


def residency(paths: Iterable[str | os.PathLike[str]]) -> Residency:
    """How many bytes of `paths` the page cache holds now."""
    total = 0
    resident: int | None = 0
    for p in map(Path, paths):
        size = p.stat().st_size
        total += size
        r = _resident_bytes(p, size)
        resident = None if r is None or resident is None else resident + r
    return Residency(total, resident)


@dataclass(frozen=True)
class PreloadResult:
    bytes_read: int
    seconds: float
    before: Residency  # residency when the preload started: was it a hit already?

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def preload(paths: Sequence[str | os.PathLike[str]], *, clock=time.perf_counter) -> PreloadResult:
    """Bring `paths` into the page cache; returns when every byte has been read once."""
    paths = [Path(p) for p in paths]
    before = residency(paths)
    start = clock()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return PreloadResult(total, clock() - start, before)


def evict(paths: Iterable[str | os.PathLike[str]]) -> Residency:
    """Drop `paths` from the page cache (clean pages only: these are read-only weight files); returns the
    residency after. Pages another process has mapped and touched may stay."""
    paths = [Path(p) for p in paths]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            # DONTNEED drops clean pages only: a file written moments ago (a fresh preparation) is written
            # back first so that it can go too.
            os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return residency(paths)
