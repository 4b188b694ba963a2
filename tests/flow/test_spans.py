"""Coalescing, pure: the batch keeps its byte mapping, comes out sorted and disjoint, nothing mergeable."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.flow import InvalidTransferError, TransferEntry, coalesce
from deepflow.flow.spans import Span, check_bounds


def byte_map(entries: list[TransferEntry]) -> dict[tuple[str, int], tuple[str, int]]:
    out = {}
    for e in entries:
        for i in range(e.length):
            out[(e.dst_region, e.dst_offset + i)] = (e.src_region, e.src_offset + i)
    return out


@st.composite
def batches(draw) -> list[TransferEntry]:
    """Disjoint destinations over two regions, many adjacent, sources often contiguous with the previous
    entry's (so merges happen), drawn in a shuffled order."""
    entries = []
    for dst_region in ("d0", "d1"):
        offset = draw(st.integers(0, 5))
        prev_src = None
        for _ in range(draw(st.integers(0, 8))):
            length = draw(st.integers(0, 6))
            src_region = draw(st.sampled_from(["s0", "s1"]))
            if prev_src is not None and draw(st.booleans()):
                src_region, src_offset = prev_src
            else:
                src_offset = draw(st.integers(0, 40))
            entries.append(TransferEntry(src_region, src_offset, dst_region, offset, length))
            prev_src = (src_region, src_offset + length)
            offset += length + draw(st.sampled_from([0, 0, 1, 3]))
    return draw(st.permutations(entries))


def mergeable(a: TransferEntry, b: TransferEntry) -> bool:
    return (
        a.dst_region == b.dst_region
        and a.src_region == b.src_region
        and a.dst_offset + a.length == b.dst_offset
        and a.src_offset + a.length == b.src_offset
    )


@settings(max_examples=300, deadline=None)
@given(batches())
def test_coalesce_keeps_the_byte_mapping_and_merges_every_run(entries):
    out = coalesce(entries)
    assert byte_map(out) == byte_map(entries)
    assert all(e.length > 0 for e in out)
    assert sum(e.length for e in out) == sum(e.length for e in entries)
    for a, b in itertools.pairwise(out):
        assert (a.dst_region, a.dst_offset + a.length) <= (b.dst_region, b.dst_offset)  # sorted, disjoint
        assert not mergeable(a, b)


def test_coalesce_merges_a_contiguous_run_into_one_entry():
    run = [TransferEntry("s", 10 * i, "d", 100 + 10 * i, 10) for i in range(50)]
    assert coalesce(reversed(run)) == [TransferEntry("s", 0, "d", 100, 500)]


@pytest.mark.parametrize(
    "entries, match",
    [
        ([TransferEntry("s", 0, "d", 0, 4), TransferEntry("s", 9, "d", 3, 4)], "overlapping"),
        ([TransferEntry("s", 0, "d", 0, -1)], "negative"),
        ([TransferEntry("s", -1, "d", 0, 1)], "negative"),
    ],
)
def test_coalesce_refuses_ambiguous_batches(entries, match):
    with pytest.raises(InvalidTransferError, match=match):
        coalesce(entries)


def test_same_destination_offset_in_two_regions_is_not_an_overlap():
    out = coalesce([TransferEntry("s", 0, "d1", 0, 4), TransferEntry("s", 0, "d0", 0, 4)])
    assert [e.dst_region for e in out] == ["d0", "d1"]


def test_check_bounds_names_region_and_span():
    check_bounds([Span("r", 0, 10)], {"r": 10}, "here")
    with pytest.raises(
        InvalidTransferError, match=r"\[5, 11\) out of bounds of region 'r' \(10 bytes\) at here"
    ):
        check_bounds([Span("r", 5, 6)], {"r": 10}, "here")
