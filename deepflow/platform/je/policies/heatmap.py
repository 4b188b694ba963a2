"""The PD heatmap (paper §5.3, Figure 5): where disaggregated serving beats colocated, by request shape.

Rows are prefill (prompt) lengths, columns ratios decode length / prefill length. A cell holds, per RPS,
`JCT_coloc / JCT_disagg − 1` measured with identical requests of that shape on a colocated and on a
disaggregated deployment: > 0 means disaggregated was faster, < 0 colocated. The PD-aware router reads the
RPS-summed map (§5.3.2: "we combine the heat maps across all RPS values through element-wise addition").

The grid's values are cell centres; a request falls in the cell nearest to it in log space (boundaries at
the geometric midpoints of neighbouring centres, lengths and ratios being scale quantities). Outside the
grid it falls in the edge cell (`Lookup.inside` says so): the trends of Figure 5 are monotone towards the
edges, so the edge's sign is the best guess there.

JSON with a schema version (`SCHEMA_VERSION`); `deepflow pd-heatmap` writes it, the router loads it. Pure:
`json` and the standard library only (the PNG is drawn by `deepflow.bench.pd_heatmap`).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "Heatmap", "Lookup", "relative_gain"]

SCHEMA_VERSION = 1
KIND = "deepflow.pd_heatmap"

Grid = tuple[tuple[float | None, ...], ...]  # [row][col]; None: not measured


def relative_gain(jct_coloc: float | None, jct_disagg: float | None) -> float | None:
    """`JCT_coloc / JCT_disagg − 1`; None when either is missing or the disaggregated JCT is not positive."""
    if jct_coloc is None or jct_disagg is None or not jct_disagg > 0:
        return None
    return jct_coloc / jct_disagg - 1.0


@dataclass(frozen=True)
class Lookup:
    """Where a request fell: its cell, the summed value there (None: not measured), inside the grid?"""

    row: int
    col: int
    value: float | None
    inside: bool


def _cell_index(centres: Sequence[float], x: float) -> tuple[int, bool]:
    """Index of the centre nearest to `x` in log space, and whether `x` lies within the grid's span
    (from the first centre's lower half-cell to the last's upper one, mirrored at the edges)."""
    if len(centres) == 1:
        return 0, True  # one centre: the whole axis is its cell
    logs = [math.log(c) for c in centres]
    lx = math.log(max(x, 1e-12))
    bounds = [(a + b) / 2 for a, b in itertools.pairwise(logs)]
    i = bisect.bisect_right(bounds, lx)
    lo = logs[0] - (bounds[0] - logs[0])
    hi = logs[-1] + (logs[-1] - bounds[-1])
    return i, lo <= lx <= hi


def _grid(rows: Sequence[Sequence[float | None]], n_rows: int, n_cols: int, what: str) -> Grid:
    if len(rows) != n_rows or any(len(r) != n_cols for r in rows):
        raise ValueError(f"{what}: expected {n_rows} rows of {n_cols} cells")
    return tuple(tuple(None if v is None else float(v) for v in r) for r in rows)


@dataclass(frozen=True)
class Heatmap:
    """Per-RPS grids of `JCT_coloc / JCT_disagg − 1` over (prefill length × decode/prefill ratio).

    prefill_lengths: row centres, ascending (tokens). ratios: column centres, ascending (decode / prefill).
    by_rps: RPS → grid [row][col]. meta: free-form provenance (model, deployments, grid, when).
    """

    prefill_lengths: tuple[int, ...]
    ratios: tuple[float, ...]
    by_rps: Mapping[float, Grid]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pl, rs = tuple(int(p) for p in self.prefill_lengths), tuple(float(r) for r in self.ratios)
        if not pl or not rs:
            raise ValueError("a heatmap needs at least one prefill length and one ratio")
        if any(p < 1 for p in pl) or any(not r > 0 for r in rs):
            raise ValueError("prefill lengths must be >= 1 and ratios > 0")
        if list(pl) != sorted(set(pl)) or list(rs) != sorted(set(rs)):
            raise ValueError("prefill lengths and ratios must be strictly ascending")
        if not self.by_rps:
            raise ValueError("a heatmap needs at least one RPS")
        grids = {
            float(rps): _grid(g, len(pl), len(rs), f"rps {rps}") for rps, g in sorted(self.by_rps.items())
        }
        object.__setattr__(self, "prefill_lengths", pl)
        object.__setattr__(self, "ratios", rs)
        object.__setattr__(self, "by_rps", grids)
        object.__setattr__(self, "meta", dict(self.meta))

    # -- the map the router reads

    @property
    def rps(self) -> tuple[float, ...]:
        return tuple(self.by_rps)

    @property
    def summed(self) -> Grid:
        """Element-wise sum over the RPS (§5.3.2); a cell measured at no RPS is None, at some: their sum."""
        out = []
        for i in range(len(self.prefill_lengths)):
            row = []
            for j in range(len(self.ratios)):
                vals = [g[i][j] for g in self.by_rps.values() if g[i][j] is not None]
                row.append(sum(vals) if vals else None)  # type: ignore[arg-type]
            out.append(tuple(row))
        return tuple(out)

    def lookup(self, prompt_len: int, decode_len: int) -> Lookup:
        """The summed map's cell for a request of `prompt_len` tokens expected to generate `decode_len`."""
        p = max(1, prompt_len)
        row, in_rows = _cell_index(self.prefill_lengths, p)
        col, in_cols = _cell_index(self.ratios, max(1, decode_len) / p)
        summed = self._summed_cache()
        return Lookup(row, col, summed[row][col], in_rows and in_cols)

    def value(self, prompt_len: int, decode_len: int) -> float | None:
        return self.lookup(prompt_len, decode_len).value

    def _summed_cache(self) -> Grid:
        cached = self.__dict__.get("_summed")
        if cached is None:
            cached = self.summed
            object.__setattr__(self, "_summed", cached)  # frozen: computed once, on first lookup
        return cached

    # -- stability across RPS (§5.3.2: "over 80% of the squares consistently show either positive or
    #    negative values across all RPSs")

    def stability(self) -> float | None:
        """Share of cells whose sign (−, 0, +) is the same at every RPS, among the cells measured at every
        RPS; None when there is no such cell. With one RPS every measured cell agrees (1.0)."""
        agree = total = 0
        for i in range(len(self.prefill_lengths)):
            for j in range(len(self.ratios)):
                vals = [g[i][j] for g in self.by_rps.values()]
                if any(v is None for v in vals):
                    continue
                total += 1
                agree += len({math.copysign(1.0, v) if v else 0.0 for v in vals}) == 1  # type: ignore[arg-type]
        return agree / total if total else None

    def disaggregated_share(self) -> float | None:
        """Share of the summed map's measured cells where disaggregated wins (> 0)."""
        vals = [v for row in self.summed for v in row if v is not None]
        return sum(v > 0 for v in vals) / len(vals) if vals else None

    def describe(self) -> dict[str, Any]:
        """A short JSON-able summary (the router's report)."""
        return {
            "prefill_lengths": list(self.prefill_lengths),
            "ratios": list(self.ratios),
            "rps": list(self.rps),
            "stability": self.stability(),
            "disaggregated_share": self.disaggregated_share(),
        }

    # -- JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "prefill_lengths": list(self.prefill_lengths),
            "ratios": list(self.ratios),
            "by_rps": [{"rps": rps, "values": [list(r) for r in g]} for rps, g in self.by_rps.items()],
            "summed": [list(r) for r in self.summed],
            "stability": self.stability(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Heatmap:
        """Parse `to_dict`'s output; raise ValueError on another kind or schema version (`summed` and
        `stability` are derived, so they are recomputed, not read)."""
        if data.get("kind") != KIND:
            raise ValueError(f"not a PD heatmap (kind {data.get('kind')!r}, expected {KIND!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"PD heatmap schema version {version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        try:
            return cls(
                prefill_lengths=tuple(data["prefill_lengths"]),
                ratios=tuple(data["ratios"]),
                by_rps={float(e["rps"]): e["values"] for e in data["by_rps"]},
                meta=data.get("meta") or {},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed PD heatmap: {exc!r}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Heatmap:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the JSON (file I/O happens here, when asked: the router loads once, at construction)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Heatmap:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
