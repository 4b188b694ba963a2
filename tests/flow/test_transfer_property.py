"""Property: any batch of disjoint random spans (adjacent ones included, across region part boundaries)
pushed and then pulled is byte-exact on both backends — two agents in this process, real sockets and real
shared memory between them (the two-process cases are in test_agent.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.flow import Backend, TransferAgent, TransferEntry, allocate_shared

SIZE = 1 << 16
PARTS = (1000, 20_000, SIZE - 21_000)  # the target region's parts: spans cross their boundaries
WAIT = 20.0


@pytest.fixture(scope="module")
def world(layout):
    seg = allocate_shared(SIZE, "prop")
    target = TransferAgent("target", layout)
    bounds = np.cumsum([0, *PARTS])
    target.register("kv", [seg.array[bounds[i] : bounds[i + 1]] for i in range(len(PARTS))])
    src = np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8)
    initiators = {}
    backs = {}
    for backend in (Backend.TCP, Backend.SHM):
        agent = TransferAgent(f"initiator-{backend.value}", layout)
        agent.register("src", [src[:777], src[777:]])
        backs[backend] = np.zeros(SIZE, dtype=np.uint8)
        agent.register("back", backs[backend])
        assert agent.connect(target.address, backend=backend).backend is backend
        initiators[backend] = agent
    yield seg, src, initiators, backs
    for agent in initiators.values():
        agent.close()
    target.close()
    seg.close()


@st.composite
def span_batches(draw) -> list[tuple[int, int, int]]:
    """(src offset, dst offset, length) with disjoint destinations, a third of them adjacent, sources
    often continuing the previous one (so coalescing merges them)."""
    out = []
    dst = draw(st.integers(0, 100))
    src = draw(st.integers(0, SIZE // 2))
    for _ in range(draw(st.integers(1, 30))):
        length = draw(st.integers(0, 3000))
        if dst + length > SIZE:
            break
        if not draw(st.booleans()):
            src = draw(st.integers(0, SIZE - length))
        if src + length > SIZE:
            src = 0
        out.append((src, dst, length))
        src += length
        dst += length + draw(st.sampled_from([0, 0, 1, 500]))
    return draw(st.permutations(out))


@settings(max_examples=40, deadline=None)
@given(batch=span_batches(), backend=st.sampled_from([Backend.TCP, Backend.SHM]))
def test_random_span_batches_are_byte_exact(world, batch, backend):
    seg, src, initiators, backs = world
    agent = initiators[backend]
    seg.array[:] = 0
    expected = np.zeros(SIZE, dtype=np.uint8)
    for s, d, n in batch:
        expected[d : d + n] = src[s : s + n]
    agent.write("target", [TransferEntry("src", s, "kv", d, n) for s, d, n in batch]).wait(WAIT)
    assert np.array_equal(seg.array, expected)

    back = backs[backend]
    back[:] = 0
    want = np.zeros(SIZE, dtype=np.uint8)
    for s, d, n in batch:  # pull the same spans back to where they came from
        want[s : s + n] = expected[d : d + n]
    reads = [TransferEntry("kv", d, "back", s, n) for s, d, n in batch]
    if not _overlaps(batch):  # sources read twice would be two writes to one byte of `back`: refused
        agent.read("target", reads).wait(WAIT)
        assert np.array_equal(back, want)


def _overlaps(batch: list[tuple[int, int, int]]) -> bool:
    spans = sorted((s, s + n) for s, _, n in batch if n)
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))
