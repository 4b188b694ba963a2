"""The PD heatmap: summing over RPS, lookup (inside and outside the grid), stability, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.platform.je.policies.heatmap import SCHEMA_VERSION, Heatmap, relative_gain

PL = (128, 512, 2048)
RATIOS = (0.0625, 0.25, 1.0)
# Rows: prefill length; columns: decode / prefill. Long prompts with short answers favour disaggregated.
LOW = ((-0.1, -0.2, -0.3), (0.2, -0.05, -0.2), (0.8, 0.3, 0.05))
HIGH = ((-0.2, -0.3, -0.1), (0.5, 0.1, -0.1), (1.5, 0.6, None))


def hm() -> Heatmap:
    return Heatmap(PL, RATIOS, {1.0: LOW, 4.0: HIGH}, meta={"model": "m"})


def test_relative_gain() -> None:
    assert relative_gain(2.0, 1.0) == 1.0 and relative_gain(1.0, 2.0) == -0.5
    assert relative_gain(None, 1.0) is None and relative_gain(1.0, 0.0) is None


def test_summed_map_adds_the_rps_and_skips_unmeasured_cells() -> None:
    s = hm().summed
    assert s[0] == pytest.approx((-0.3, -0.5, -0.4))
    assert s[1] == pytest.approx((0.7, 0.05, -0.3))
    assert s[2][:2] == pytest.approx((2.3, 0.9)) and s[2][2] == 0.05  # measured at one RPS only
    assert Heatmap(PL, RATIOS, {1.0: [[None] * 3] * 3}).summed == ((None,) * 3,) * 3


def test_lookup_nearest_cell_in_log_space() -> None:
    h = hm()
    c = h.lookup(2048, 128)  # ratio 1/16: long prompt, short answer
    assert (c.row, c.col, c.inside) == (2, 0, True) and c.value == pytest.approx(2.3)
    assert h.lookup(128, 128).value == pytest.approx(-0.4)  # ratio 1
    # Between 128 and 512 the boundary is their geometric mean, 256.
    assert h.lookup(255, 64).row == 0 and h.lookup(257, 64).row == 1
    # Between ratios 1/16 and 1/4 the boundary is 1/8.
    assert h.lookup(1024, 127).col == 0 and h.lookup(1024, 129).col == 1


def test_lookup_outside_the_grid_takes_the_edge_cell() -> None:
    h = hm()
    for prompt, decode, row, col in [(10, 1, 0, 0), (100_000, 50, 2, 0), (100, 5000, 0, 2), (1, 0, 0, 2)]:
        c = h.lookup(prompt, decode)
        assert (c.row, c.col, c.inside) == (row, col, False), (prompt, decode)
    # Just past the last centre but inside its half-cell: still inside.
    assert h.lookup(3000, 3000).inside
    assert not h.lookup(5000, 5000).inside


def test_one_by_one_grid_covers_everything() -> None:
    h = Heatmap((256,), (0.5,), {2.0: [[0.4]]})
    assert h.lookup(1, 1).value == 0.4 and h.lookup(10**6, 10**6).inside


def test_stability_is_the_share_of_cells_with_one_sign_at_every_rps() -> None:
    # 8 cells are measured at both RPS (the None one is left out); only (1, 1) flips: -0.05 vs +0.1.
    assert hm().stability() == pytest.approx(7 / 8)
    assert Heatmap(PL, RATIOS, {1.0: LOW}).stability() == 1.0
    assert Heatmap((1,), (1.0,), {1.0: [[0.0]], 2.0: [[0.1]]}).stability() == 0.0
    assert Heatmap((1,), (1.0,), {1.0: [[None]], 2.0: [[0.1]]}).stability() is None


def test_json_roundtrip_with_schema_version(tmp_path: Path) -> None:
    h = hm()
    path = tmp_path / "h.json"
    h.save(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "deepflow.pd_heatmap"
    assert data["summed"][2][0] == pytest.approx(2.3) and data["stability"] == pytest.approx(7 / 8)
    back = Heatmap.load(path)
    assert back == h and back.meta == {"model": "m"} and back.rps == (1.0, 4.0)
    with pytest.raises(ValueError, match="schema version"):
        Heatmap.from_dict({**data, "schema_version": 99})
    with pytest.raises(ValueError, match="not a PD heatmap"):
        Heatmap.from_dict({**data, "kind": "other"})
    with pytest.raises(ValueError, match="malformed"):
        Heatmap.from_dict({k: v for k, v in data.items() if k != "ratios"})


def test_invalid_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="ascending"):
        Heatmap((512, 128), (1.0,), {1.0: [[0.0], [0.0]]})
    with pytest.raises(ValueError, match="rows"):
        Heatmap(PL, RATIOS, {1.0: LOW[:2]})
    with pytest.raises(ValueError, match="at least one RPS"):
        Heatmap(PL, RATIOS, {})
    with pytest.raises(ValueError, match="ratios > 0"):
        Heatmap((1,), (0.0,), {1.0: [[0.0]]})


grids = st.integers(1, 4).flatmap(
    lambda rows: st.integers(1, 4).flatmap(
        lambda cols: st.tuples(
            st.lists(st.integers(1, 8192), min_size=rows, max_size=rows, unique=True).map(sorted),
            st.lists(st.floats(0.01, 16), min_size=cols, max_size=cols, unique=True).map(sorted),
            st.lists(
                st.lists(
                    st.lists(st.none() | st.floats(-5, 5), min_size=cols, max_size=cols),
                    min_size=rows,
                    max_size=rows,
                ),
                min_size=1,
                max_size=3,
            ),
        )
    )
)


@settings(max_examples=100, deadline=None)
@given(grid=grids, prompt=st.integers(0, 100_000), decode=st.integers(0, 100_000))
def test_lookup_is_the_nearest_centre_and_json_roundtrips(
    grid: tuple[list[int], list[float], list[list[list[float | None]]]], prompt: int, decode: int
) -> None:
    import math

    pls, ratios, maps = grid
    h = Heatmap(tuple(pls), tuple(ratios), {float(i + 1): m for i, m in enumerate(maps)})
    c = h.lookup(prompt, decode)
    p = max(1, prompt)
    r = max(1, decode) / p
    dist_row = [abs(math.log(x) - math.log(p)) for x in pls]
    dist_col = [abs(math.log(x) - math.log(r)) for x in ratios]
    assert dist_row[c.row] == pytest.approx(min(dist_row))
    assert dist_col[c.col] == pytest.approx(min(dist_col))
    assert c.value == h.summed[c.row][c.col]
    assert Heatmap.from_json(h.to_json()) == h
