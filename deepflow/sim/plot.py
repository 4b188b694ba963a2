"""A PNG of a simulated run (matplotlib, imported only here): load, KV usage, throughput, TTFT over time."""

from __future__ import annotations

from pathlib import Path

from deepflow.sim.simulation import SimResult

__all__ = ["plot_result"]


def plot_result(result: SimResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = result.timeseries
    t = ts["t"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    ax = axes[0][0]
    ax.plot(t, ts["running"], label="running")
    ax.plot(t, ts["waiting"], label="waiting")
    ax.set_ylabel("requests (cluster)")
    ax.legend()
    ax = axes[0][1]
    ax.plot(t, [u * 100 for u in ts["kv_usage"]])
    ax.set_ylabel("KV pool in use (mean %)")
    ax = axes[1][0]
    rate = [0.0] + [
        (b - a) / (t2 - t1) if t2 > t1 else 0.0
        for a, b, t1, t2 in zip(ts["output_tokens"], ts["output_tokens"][1:], t, t[1:], strict=False)
    ]
    ax.plot(t, rate)
    ax.set_ylabel("output tokens/s")
    ax.set_xlabel("simulated time (s)")
    ax = axes[1][1]
    done = sorted((r.start_s, r.ttft_s * 1e3) for r in result.records if r.success and r.ttft_s is not None)
    if done:
        ax.scatter([d[0] for d in done], [d[1] for d in done], s=2, alpha=0.3)
        ax.set_yscale("log")
    ax.set_ylabel("TTFT (ms, by arrival)")
    ax.set_xlabel("simulated time (s)")
    cfg = result.config
    fig.suptitle(f"deepflow sim: {cfg.num_tes} TEs, {cfg.policy}; {result.workload}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
