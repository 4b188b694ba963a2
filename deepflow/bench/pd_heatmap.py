"""`deepflow pd-heatmap`: measure the paper's Figure 5 on real servers — colocated vs disaggregated JCT.

For every cell of a grid (prefill length × decode length / prefill length) and every RPS, the same batch of
identical-shape requests is sent, open loop (Poisson arrivals at that RPS), to a colocated deployment and
to a disaggregated one (e.g. `deepflow serve --tes 2` and `deepflow serve --pd 1:1`): prompts of exactly
the prefill length (token ids over `/v1/completions`, from the bench's word pool), `ignore_eos` with
`max_tokens` = the decode length, greedy. A cell's value is `JCT_coloc / JCT_disagg − 1` with JCT the mean
end-to-end latency of the successful requests (> 0: disaggregated was faster). The result is a
`policies.heatmap.Heatmap` (JSON, schema-versioned, with every run's numbers in `meta.measurements`) that
the PD-aware router loads, and a PNG drawn like Figure 5: one panel per RPS and the RPS-summed map,
diverging colours centred at 0, values in the cells; the title gives the stability across RPS.

Fairness: the two deployments get the same prompts and the same arrival times for a cell, and are measured
one after the other, cell by cell, which one first alternating (drift and order effects cancel out). Every
cell and RPS draws its own prompts (an independent random stream), so no run finds another's prompts in a
prefix cache. A few warm-up requests go to each deployment first (first-request costs are not the
deployment's).

The default grid (2 prefill lengths × 3 ratios × 2 RPS × 6 requests × 2 deployments) runs in minutes on a
2-core CPU with SmolLM2-135M; widen it with --prefill-lengths/--ratios/--rps on real hardware.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from deepflow import __version__
from deepflow.bench.client import RequestRecord, completions_payload, stream_request
from deepflow.bench.clock import SYSTEM_CLOCK, Clock
from deepflow.bench.datasets import random_dataset, rng_for
from deepflow.bench.report import percentile
from deepflow.bench.tokens import WordPool, build_word_pool, resolve_tokenizer
from deepflow.platform.je.policies.heatmap import Heatmap, relative_gain

__all__ = [
    "DEFAULT_PREFILL_LENGTHS",
    "DEFAULT_RATIOS",
    "DEFAULT_RPS",
    "DEPLOYMENTS",
    "PDHeatmapConfig",
    "PDHeatmapResult",
    "RunStats",
    "plot_heatmap",
    "run_pd_heatmap",
]

DEFAULT_PREFILL_LENGTHS = (128, 512)
DEFAULT_RATIOS = (0.03125, 0.125, 0.5)
DEFAULT_RPS = (1.0, 4.0)
DEPLOYMENTS = ("colocated", "disaggregated")
_COMPLETIONS = "/v1/completions"
_STREAM_BASE = 1000  # random streams of the cells' prompts and arrivals (the bench uses 0..2)


@dataclass
class PDHeatmapConfig:
    colocated_url: str
    disaggregated_url: str
    model: str
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    rps: tuple[float, ...] = DEFAULT_RPS
    num_prompts: int = 6  # requests per cell, RPS and deployment
    seed: int = 0
    tokenizer: str | None = None  # HF folder; None: the colocated server's /tokenize, else the embedded model
    api_key: str | None = None
    timeout: float = 300.0  # seconds per request
    warmup: int = 2  # unmeasured requests per deployment, before the grid
    progress: bool = False

    def __post_init__(self) -> None:
        self.prefill_lengths = tuple(int(p) for p in self.prefill_lengths)
        self.ratios = tuple(float(r) for r in self.ratios)
        self.rps = tuple(float(r) for r in self.rps)

    def validate(self) -> None:
        for name, url in (
            ("--colocated-url", self.colocated_url),
            ("--disaggregated-url", self.disaggregated_url),
        ):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must start with http:// or https://, not {url!r}")
        if not self.prefill_lengths or not self.ratios or not self.rps:
            raise ValueError("the grid needs at least one prefill length, one ratio and one RPS")
        if any(p < 1 for p in self.prefill_lengths):
            raise ValueError("prefill lengths must be at least 1")
        if any(not r > 0 for r in self.ratios) or any(not r > 0 for r in self.rps):
            raise ValueError("ratios and RPS must be positive")
        for what, values in (("prefill lengths", self.prefill_lengths), ("ratios", self.ratios)):
            if list(values) != sorted(set(values)):
                raise ValueError(f"{what} must be distinct and ascending")
        if self.num_prompts < 1 or self.warmup < 0 or not self.timeout > 0:
            raise ValueError("--num-prompts must be >= 1, --warmup >= 0 and --timeout > 0")

    @staticmethod
    def decode_len(prefill_len: int, ratio: float) -> int:
        """Decode tokens of a cell: prefill × ratio, at least 1."""
        return max(1, round(prefill_len * ratio))

    @staticmethod
    def root(url: str) -> str:
        return url.rstrip("/").removesuffix("/v1")

    def url(self, deployment: str) -> str:
        return self.root(self.colocated_url if deployment == "colocated" else self.disaggregated_url)


@dataclass(frozen=True)
class RunStats:
    """One (RPS, cell, deployment) run: latencies in seconds over its successful requests."""

    rps: float
    prefill_len: int
    ratio: float
    decode_len: int
    deployment: str
    completed: int
    failed: int
    jct_mean_s: float | None
    jct_p50_s: float | None
    ttft_mean_s: float | None
    tpot_mean_s: float | None
    errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        rps: float,
        prefill_len: int,
        ratio: float,
        decode_len: int,
        deployment: str,
        records: Sequence[RequestRecord],
    ) -> RunStats:
        ok = [r for r in records if r.success and r.e2e_s is not None]
        e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot = [t for r in ok if (t := r.tpot_s) is not None]
        errors: dict[str, int] = {}
        for r in records:
            if not r.success:
                errors[r.error_kind or "error"] = errors.get(r.error_kind or "error", 0) + 1

        def mean(xs: Sequence[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return cls(
            rps=rps,
            prefill_len=prefill_len,
            ratio=ratio,
            decode_len=decode_len,
            deployment=deployment,
            completed=len(ok),
            failed=len(records) - len(ok),
            jct_mean_s=mean(e2e),
            jct_p50_s=percentile(e2e, 50) if e2e else None,
            ttft_mean_s=mean(ttft),
            tpot_mean_s=mean(tpot),
            errors=errors,
        )


@dataclass
class PDHeatmapResult:
    heatmap: Heatmap
    runs: list[RunStats]

    def table(self) -> str:
        """The summed map and each RPS's, as text (rows: prefill length; columns: decode / prefill)."""
        h = self.heatmap
        lines = []
        grids = [(f"rps {rps:g}", g) for rps, g in h.by_rps.items()] + [("summed", h.summed)]
        for title, grid in grids:
            lines.append(f"{title}: JCT_coloc / JCT_disagg - 1 (> 0: disaggregated faster)")
            lines.append("prefill \\ ratio " + "".join(f"{r:>10g}" for r in h.ratios))
            for p, row in zip(h.prefill_lengths, grid, strict=True):
                cells = "".join(f"{'-':>10}" if v is None else f"{v:>+10.3f}" for v in row)
                lines.append(f"{p:>15d} {cells}")
            lines.append("")
        stability = h.stability()
        lines.append(f"stability across RPS: {'-' if stability is None else f'{stability:.0%}'} of cells")
        return "\n".join(lines)


def _arrivals(n: int, rps: float, seed: int, stream: int) -> list[float]:
    """Start offsets (s) of `n` Poisson arrivals at `rps`, the first at 0 (one random stream per run)."""
    gaps = rng_for(seed, stream).exponential(1.0 / rps, size=n)
    gaps[0] = 0.0
    return gaps.cumsum().tolist()


async def _open_loop(
    client: httpx.AsyncClient,
    config: PDHeatmapConfig,
    prompts: Sequence[list[int]],
    decode_len: int,
    arrivals: Sequence[float],
    clock: Clock,
) -> list[RequestRecord]:
    t0 = clock.now()
    records = [RequestRecord(i, i, 0, len(p)) for i, p in enumerate(prompts)]

    async def one(record: RequestRecord, prompt: list[int]) -> None:
        record.start_s = clock.now() - t0
        payload = completions_payload(config.model, prompt, decode_len, temperature=0.0, ignore_eos=True)
        await stream_request(client, _COMPLETIONS, payload, record, config.timeout, clock)

    tasks = []
    for record, prompt, at in zip(records, prompts, arrivals, strict=True):
        await clock.sleep_until(t0 + at)
        tasks.append(asyncio.create_task(one(record, prompt)))
    await asyncio.gather(*tasks)
    return records


def _prompts(pool: WordPool, n: int, length: int, seed: int, stream: int) -> list[list[int]]:
    sessions = random_dataset(pool, n, length, seed, as_text=False, stream=stream)
    return [list(s.turns[0].prompt) for s in sessions]  # type: ignore[arg-type]


async def run_pd_heatmap(
    config: PDHeatmapConfig,
    *,
    clock: Clock | None = None,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    on_run: Callable[[RunStats], None] | None = None,
) -> PDHeatmapResult:
    """Measure the grid on both deployments and return the heatmap with every run's numbers.

    `clock` (default: real time) takes every time and makes every wait; `transports` (by deployment name)
    replace httpx's network transport (tests route them to in-process fakes on a virtual clock). The
    tokenizer still reaches the colocated server's `/tokenize` over the network (unless `config.tokenizer`).
    """
    clock = clock or SYSTEM_CLOCK
    transports = transports or {}
    config.validate()
    tokenizer = await asyncio.to_thread(
        resolve_tokenizer, config.tokenizer, config.url("colocated"), config.model, config.api_key
    )
    pool = await asyncio.to_thread(build_word_pool, tokenizer)
    close = getattr(tokenizer, "close", None)
    if callable(close):
        close()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    clients = {
        d: httpx.AsyncClient(
            base_url=config.url(d),
            headers=headers,
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transports.get(d),
        )
        for d in DEPLOYMENTS
    }
    runs: list[RunStats] = []
    grids = {rps: [[None] * len(config.ratios) for _ in config.prefill_lengths] for rps in config.rps}
    try:
        if config.warmup:
            warm = _prompts(pool, config.warmup, min(config.prefill_lengths), config.seed, _STREAM_BASE - 1)
            for d in DEPLOYMENTS:
                for prompt in warm:  # one at a time: only warms the server up
                    record = RequestRecord(-1, -1, 0, len(prompt))
                    payload = completions_payload(config.model, prompt, 4, temperature=0.0, ignore_eos=True)
                    await stream_request(clients[d], _COMPLETIONS, payload, record, config.timeout, clock)
        cell = 0
        for rps in config.rps:
            for i, prefill in enumerate(config.prefill_lengths):
                for j, ratio in enumerate(config.ratios):
                    cell += 1
                    decode = config.decode_len(prefill, ratio)
                    stream = _STREAM_BASE + 2 * cell
                    prompts = _prompts(pool, config.num_prompts, prefill, config.seed, stream)
                    arrivals = _arrivals(config.num_prompts, rps, config.seed, stream + 1)
                    jct: dict[str, float | None] = {}
                    # Alternate which deployment goes first, so drift and order effects cancel out.
                    for d in DEPLOYMENTS if cell % 2 else DEPLOYMENTS[::-1]:
                        records = await _open_loop(clients[d], config, prompts, decode, arrivals, clock)
                        stats = RunStats.of(rps, prefill, ratio, decode, d, records)
                        runs.append(stats)
                        jct[d] = stats.jct_mean_s
                        if on_run is not None:
                            on_run(stats)
                    grids[rps][i][j] = relative_gain(jct["colocated"], jct["disaggregated"])  # type: ignore[call-overload]
    finally:
        for c in clients.values():
            await c.aclose()
    heatmap = Heatmap(
        prefill_lengths=config.prefill_lengths,
        ratios=config.ratios,
        by_rps=grids,  # type: ignore[arg-type]
        meta={
            "model": config.model,
            "deployments": {d: config.url(d) for d in DEPLOYMENTS},
            "num_prompts": config.num_prompts,
            "seed": config.seed,
            "jct": "mean end-to-end latency (s) of the successful requests",
            "tokenizer": tokenizer.description,
            "started_at": started_at,
            "deepflow_version": __version__,
            "measurements": [asdict(r) for r in runs],
        },
    )
    return PDHeatmapResult(heatmap, runs)


def plot_heatmap(heatmap: Heatmap, path: str | Path, title: str | None = None) -> None:
    """A PNG like the paper's Figure 5: a panel per RPS and the RPS-summed map; rows prefill length
    (longest on top), columns decode / prefill; red > 0 (disaggregated faster), blue < 0, white 0; the
    value in each cell (unmeasured: '-')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    panels = [(f"RPS {rps:g}", g) for rps, g in heatmap.by_rps.items()] + [
        ("summed over RPS", heatmap.summed)
    ]
    n_rows, n_cols = len(heatmap.prefill_lengths), len(heatmap.ratios)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(4.0, 0.9 * n_cols + 1.8) * len(panels), 1.8 + 0.6 * n_rows),
        squeeze=False,
    )
    for ax, (name, grid) in zip(axes[0], panels, strict=True):
        values = [[float("nan") if v is None else v for v in row] for row in grid]
        finite = [abs(v) for row in values for v in row if v == v]
        bound = max(finite, default=0.0) or 1.0
        image = ax.imshow(
            values,
            cmap="RdBu_r",
            norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound),
            origin="lower",
            aspect="auto",
        )
        for i in range(n_rows):
            for j in range(n_cols):
                v = grid[i][j]
                text = "-" if v is None else f"{v:+.2f}"
                dark = v is not None and abs(v) > 0.6 * bound
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(n_cols), [f"{r:g}" for r in heatmap.ratios])
        ax.set_yticks(range(n_rows), [str(p) for p in heatmap.prefill_lengths])
        ax.set_xlabel("decode length / prefill length")
        ax.set_ylabel("prefill length (tokens)")
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    stability = heatmap.stability()
    head = title or f"JCT_coloc / JCT_disagg - 1 ({heatmap.meta.get('model', 'model')})"
    sub = "" if stability is None else f"; sign stable across RPS in {stability:.0%} of cells"
    fig.suptitle(f"{head}\n> 0: disaggregated faster, < 0: colocated faster{sub}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: PDHeatmapResult, out: Path) -> tuple[Path, Path]:
    """`out`.json and `out`.png (`out` without a suffix, or with .json)."""
    base = out.with_suffix("") if out.suffix in (".json", ".png") else out
    json_path, png_path = base.with_suffix(".json"), base.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result.heatmap.save(json_path)
    plot_heatmap(result.heatmap, png_path)
    return json_path, png_path


def _progress(stats: RunStats) -> None:
    jct = "-" if stats.jct_mean_s is None else f"{stats.jct_mean_s * 1e3:.0f} ms"
    failed = f", {stats.failed} failed" if stats.failed else ""
    print(
        f"rps {stats.rps:g} prefill {stats.prefill_len} decode {stats.decode_len} {stats.deployment}: "
        f"JCT {jct}{failed}",
        file=sys.stderr,
        flush=True,
    )


def main_run(config: PDHeatmapConfig, out: Path) -> int:
    """The CLI's body: measure, write JSON + PNG, print the table; 1 when some cell could not be measured."""
    result = asyncio.run(run_pd_heatmap(config, on_run=_progress if config.progress else None))
    json_path, png_path = write_outputs(result, out)
    print(result.table())
    print(f"\nwrote {json_path} and {png_path}")
    missing = sum(v is None for g in result.heatmap.by_rps.values() for row in g for v in row)
    return 1 if missing else 0
