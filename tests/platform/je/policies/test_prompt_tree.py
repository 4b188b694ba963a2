"""The global prompt tree: events in, longest cached prefix per TE out."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.platform.je.policies import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    GlobalPromptTree,
    KVEvent,
    hash_blocks,
    root_hash,
)

BS = 4


def tree_with(*stores: tuple[str, str, list[int]]) -> GlobalPromptTree:
    tree = GlobalPromptTree(BS, verify_hashes=True)
    for te, ns, tokens in stores:
        tree.apply(BlockStored.of(te, ns, tokens, BS))
    return tree


P = list(range(100, 116))  # four blocks


# -------------------------------------------------------------------------------------------- hashing


def test_hash_blocks_skips_partial_block_and_chains() -> None:
    hashes = hash_blocks("", [*P, 1, 2], BS)
    assert len(hashes) == 4
    assert hash_blocks("", P[:8], BS) == hashes[:2]  # a prefix's hashes are a prefix of the hashes
    assert hash_blocks("", P[8:], BS, parent_hash=hashes[1]) == hashes[2:]  # a chain continues
    assert len(set(hashes)) == 4
    assert hash_blocks("", [], BS) == []


def test_hash_is_stable_across_processes_and_versions() -> None:
    # TEs and the JE may run different builds: the hash scheme is part of the wire format.
    assert root_hash("") == root_hash("")
    assert hash_blocks("", [1, 2, 3, 4], BS) == [3452166034287652244]
    assert hash_blocks("salt", [1, 2, 3, 4], BS) != hash_blocks("", [1, 2, 3, 4], BS)


def test_events_round_trip_through_msgpack() -> None:
    events: list[KVEvent] = [
        BlockStored.of("te-0", "ns", P, BS),
        BlockRemoved("te-0", hash_blocks("ns", P, BS)[2:]),
        AllCleared("te-1"),
    ]
    wire = msgspec.msgpack.encode(events)
    assert msgspec.msgpack.Decoder(list[KVEvent]).decode(wire) == events


# ------------------------------------------------------------------------------------------ insert/match


def test_match_counts_whole_blocks_of_the_longest_cached_prefix() -> None:
    tree = tree_with(("a", "", P[:8]))
    assert tree.match("", P) == {"a": 8}
    assert tree.match("", P[:7]) == {"a": 4}  # the second block is not whole in the prompt
    assert tree.match("", P[:3]) == {}
    assert tree.match("", [P[0] + 1, *P[1:]]) == {}  # diverges in the first block
    assert tree.match("", P[:4] + [0] * 12) == {"a": 4}  # diverges in the second block


def test_match_reports_each_te_its_own_depth() -> None:
    tree = tree_with(("a", "", P[:4]), ("b", "", P), ("c", "", P[:12]), ("d", "", [7] * 8))
    assert tree.match("", P) == {"a": 4, "b": 16, "c": 12}
    assert len(tree) == 4 + 2  # shared blocks are one node each
    assert tree.num_blocks("b") == 4
    assert tree.te_ids == {"a", "b", "c", "d"}


def test_blocks_stored_in_pieces_chain_like_one_store() -> None:
    tree = GlobalPromptTree(BS, verify_hashes=True)
    first = BlockStored.of("a", "", P[:8], BS)
    tree.apply(first)
    tree.apply(BlockStored.of("a", "", P[8:], BS, parent_block_hash=first.block_hashes[-1]))
    assert tree.match("", P) == {"a": 16}


def test_namespaces_are_isolated() -> None:
    tree = tree_with(("a", "alice", P), ("b", "", P))
    assert tree.match("alice", P) == {"a": 16}
    assert tree.match("", P) == {"b": 16}
    assert tree.match("bob", P) == {}


# ------------------------------------------------------------------------------------- removal, pruning


def test_removing_a_leaf_shortens_the_match_and_prunes_the_node() -> None:
    tree = tree_with(("a", "", P))
    tree.apply(BlockRemoved("a", hash_blocks("", P, BS)[3:]))
    assert tree.match("", P) == {"a": 12}
    assert len(tree) == 3


def test_a_gap_ends_the_match_for_that_te_only() -> None:
    tree = tree_with(("a", "", P), ("b", "", P))
    tree.apply(BlockRemoved("a", hash_blocks("", P, BS)[1:2]))
    assert tree.match("", P) == {"a": 4, "b": 16}
    assert len(tree) == 4  # b still holds every block


def test_removing_unknown_blocks_or_tes_is_a_no_op() -> None:
    tree = tree_with(("a", "", P))
    tree.apply(BlockRemoved("a", [123]))
    tree.apply(BlockRemoved("zz", hash_blocks("", P, BS)))
    assert tree.remove_te("zz") == 0
    assert tree.match("", P) == {"a": 16}


def test_dead_te_and_all_cleared_drop_every_entry_and_prune() -> None:
    tree = tree_with(("a", "", P), ("a", "x", P), ("b", "", P[:8]), ("c", "", P))
    assert tree.remove_te("a") == 8
    assert tree.match("", P) == {"b": 8, "c": 16}
    assert tree.match("x", P) == {}
    tree.apply(AllCleared("c"))
    assert tree.match("", P) == {"b": 8}
    assert len(tree) == 2
    tree.apply(AllCleared("b"))
    assert len(tree) == 0 and tree.te_ids == frozenset()


def test_malformed_stores_are_rejected() -> None:
    tree = GlobalPromptTree(BS, verify_hashes=True)
    good = BlockStored.of("a", "", P, BS)
    with pytest.raises(ValueError, match="tokens for"):
        tree.apply(BlockStored("a", "", None, good.block_hashes, P[:12]))
    with pytest.raises(ValueError, match="do not match"):
        tree.apply(BlockStored("a", "other-namespace", None, good.block_hashes, P))
    with pytest.raises(ValueError):
        GlobalPromptTree(0)
    assert len(tree) == 0


# ------------------------------------------------------------------------------ property: brute force

TES = ("a", "b", "c")
NAMESPACES = ("", "s")
PB = 2  # block size of the property test: small, so random prompts share prefixes often
prompts = st.lists(st.integers(0, 2), min_size=0, max_size=4 * PB)
store_ops = st.tuples(
    st.just("store"), st.sampled_from(TES), st.sampled_from(NAMESPACES), prompts, st.integers(0, 4)
)
remove_ops = st.tuples(
    st.just("remove"), st.sampled_from(TES), st.sampled_from(NAMESPACES), prompts, st.integers(0, 4)
)
clear_ops = st.tuples(st.sampled_from(["clear", "dead"]), st.sampled_from(TES))


class Oracle:
    """Per TE, the set of (namespace, prefix) it caches; a match is the longest run of held prefixes."""

    def __init__(self) -> None:
        self.held: dict[str, set[tuple[str, tuple[int, ...]]]] = {te: set() for te in TES}

    def match(self, ns: str, tokens: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for te, held in self.held.items():
            k = 0
            while (k + 1) * PB <= len(tokens) and (ns, tuple(tokens[: (k + 1) * PB])) in held:
                k += 1
            if k:
                out[te] = k * PB
        return out


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.one_of(store_ops, remove_ops, clear_ops), max_size=30), queries=st.lists(prompts))
def test_tree_matches_brute_force_oracle(ops: list[tuple], queries: list[list[int]]) -> None:
    tree = GlobalPromptTree(PB, verify_hashes=True)
    oracle = Oracle()
    for op in ops:
        if op[0] in ("store", "remove"):
            kind, te, ns, tokens, start = op
            n_blocks = len(tokens) // PB
            start = min(start, n_blocks)
            hashes = hash_blocks(ns, tokens, PB)
            prefixes = {(ns, tuple(tokens[: (k + 1) * PB])) for k in range(start, n_blocks)}
            if kind == "store":
                parent = hashes[start - 1] if start else None
                tree.apply(BlockStored.of(te, ns, tokens[start * PB :], PB, parent_block_hash=parent))
                oracle.held[te] |= prefixes
            else:
                tree.apply(BlockRemoved(te, hashes[start:]))
                oracle.held[te] -= prefixes
        else:
            kind, te = op
            tree.apply(AllCleared(te)) if kind == "clear" else tree.remove_te(te)
            oracle.held[te].clear()
    queries += [op[3] for op in ops if op[0] in ("store", "remove")]
    for ns in NAMESPACES:
        for tokens in queries:
            assert tree.match(ns, tokens) == oracle.match(ns, tokens)
    # Pruning: exactly the blocks some TE holds are nodes.
    assert len(tree) == len(set().union(*oracle.held.values()))
    for te in TES:
        assert tree.num_blocks(te) == len(oracle.held[te])
