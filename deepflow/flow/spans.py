"""Transfer entries and their coalescing: the pure part of the data plane.

A transfer is a batch of `TransferEntry`s, each copying `length` bytes from (src region, src offset) to
(dst region, dst offset). Before anything moves the batch is normalised once: empty entries dropped,
destinations checked not to overlap (so the order of entries never matters and the batch may be sorted),
and runs that are contiguous on both sides merged into one entry — a KV transfer of consecutive blocks
becomes a few large copies instead of thousands of small ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from deepflow.flow.errors import InvalidTransferError


class TransferEntry(msgspec.Struct, frozen=True, array_like=True):
    """Copy `length` bytes from `src_region`[`src_offset`:] to `dst_region`[`dst_offset`:].

    For a write (push) the source is a local region and the destination the peer's; for a read (pull) the
    other way round. Offsets are bytes into the region's address space (its parts laid end to end)."""

    src_region: str
    src_offset: int
    dst_region: str
    dst_offset: int
    length: int


class Span(msgspec.Struct, frozen=True, array_like=True):
    """`length` bytes at `offset` of one region: one side of an entry, what travels on the wire."""

    region: str
    offset: int
    length: int


def coalesce(entries: Iterable[TransferEntry]) -> list[TransferEntry]:
    """The batch normalised: sorted by destination, empty entries dropped, runs contiguous on both sides
    merged. Raises `InvalidTransferError` on a negative offset or length, or overlapping destinations (two
    entries writing the same byte would make the result depend on order)."""
    items = []
    for e in entries:
        if e.length < 0 or e.src_offset < 0 or e.dst_offset < 0:
            raise InvalidTransferError(f"negative offset or length in {e!r}")
        if e.length:
            items.append(e)
    items.sort(key=lambda e: (e.dst_region, e.dst_offset))
    out: list[TransferEntry] = []
    for e in items:
        if out:
            last = out[-1]
            if last.dst_region == e.dst_region and e.dst_offset < last.dst_offset + last.length:
                raise InvalidTransferError(f"overlapping destinations: {last!r} and {e!r}")
            if (
                last.dst_region == e.dst_region
                and last.src_region == e.src_region
                and last.dst_offset + last.length == e.dst_offset
                and last.src_offset + last.length == e.src_offset
            ):
                out[-1] = TransferEntry(
                    last.src_region, last.src_offset, last.dst_region, last.dst_offset, last.length + e.length
                )
                continue
        out.append(e)
    return out


def src_spans(entries: list[TransferEntry]) -> list[Span]:
    return [Span(e.src_region, e.src_offset, e.length) for e in entries]


def dst_spans(entries: list[TransferEntry]) -> list[Span]:
    return [Span(e.dst_region, e.dst_offset, e.length) for e in entries]


def check_bounds(spans: Iterable[Span], sizes: dict[str, int], where: str) -> None:
    """Raise `InvalidTransferError` naming the first span outside the regions `sizes` describes."""
    for s in spans:
        size = sizes.get(s.region)
        if size is None:
            raise InvalidTransferError(f"unknown region {s.region!r} at {where} (known: {sorted(sizes)})")
        if s.offset + s.length > size:
            raise InvalidTransferError(
                f"span [{s.offset}, {s.offset + s.length}) out of bounds of region {s.region!r} "
                f"({size} bytes) at {where}"
            )
