"""The simulator's cluster studies (docs/simulator.md): each case is one `deepflow sim run` command, run as a
subprocess (`-j` at a time) with `--json`; the script then tabulates the JSON files and draws the PNGs.

    python benchmarks/sim_studies.py routing  --tes 8 16 32 64 --duration 300 -j 2
    python benchmarks/sim_studies.py hotspot  --tes 64 --duration 300 -j 2
    python benchmarks/sim_studies.py report   # tables + plots from the JSON already written

Results (one JSON per case, with every request) go to --out (default /tmp/deepflow-sim-studies); the plots to
docs/img/. Cases whose JSON exists are not run again (delete it to rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
POLICIES = ("round_robin", "least_load", "locality", "combined")
DEEPFLOW = [sys.executable, "-m", "deepflow.cli"]

# The hot-spot study: single-turn requests over 32 shared prefixes whose popularity is Zipf(1.2) (the most
# popular draws ~30% of the traffic), each request 1,024 prefix + 256 own tokens, 128 output.
HOTSPOT_WORKLOAD = [
    "--workload", "shared-prefix", "--num-prefixes", "32", "--prefix-len", "1024", "--input-len", "256",
    "--output-len", "128", "--prefix-zipf", "1.2",
]  # fmt: skip
HOTSPOT_CASES = {
    "combined": ["--policy", "combined"],
    "combined_no_guard": ["--policy", "combined", "--policy-param", "hot_spot_factor=1e9"],
    "locality": ["--policy", "locality"],
    "least_load": ["--policy", "least_load"],
}


def routing_cases(tes: list[int], duration: float) -> dict[str, list[str]]:
    """The default workload (multi-turn, 8 system prompts, Poisson at 70% of the modelled capacity)."""
    return {
        f"routing-{n}-{p}": ["sim", "run", "--tes", str(n), "--policy", p, "--duration", f"{duration:g}"]
        for n in tes
        for p in POLICIES
    }


def hotspot_cases(tes: list[int], duration: float) -> dict[str, list[str]]:
    return {
        f"hotspot-{n}-{name}": ["sim", "run", "--tes", str(n), *flags, *HOTSPOT_WORKLOAD,
                                "--duration", f"{duration:g}"]
        for n in tes
        for name, flags in HOTSPOT_CASES.items()
    }  # fmt: skip


def run_case(name: str, argv: list[str], out: Path) -> dict:
    path = out / f"{name}.json"
    meta = out / f"{name}.meta.json"
    if path.exists() and meta.exists():
        return json.loads(meta.read_text())
    cmd = [*DEEPFLOW, *argv, "--json", str(path), "--quiet"]
    load = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # (with -j > 1 the children overlap: wall only)
    info = {
        "name": name,
        "command": "deepflow " + shlex.join(argv),
        "wall_s": wall,
        "cpu_s_children_delta": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "loadavg_at_start": load,
    }
    meta.write_text(json.dumps(info))
    print(f"{name}: {wall:.0f} s wall", file=sys.stderr)
    return info


def run_all(cases: dict[str, list[str]], out: Path, jobs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(run_case, n, a, out) for n, a in cases.items()]:
            future.result()


# ---------------------------------------------------------------------------------------------- report


def load_case(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    meta = json.loads((out / f"{name}.meta.json").read_text())
    s = data["summary"]
    per_te = data["per_te"]
    requests = [t["requests"] for t in per_te]
    busy = [t["busy_fraction"] for t in per_te]
    return {
        "name": name,
        "command": meta["command"],
        "tes": data["simulator"]["num_tes"],
        "policy": data["simulator"]["policy"],
        "workload": data["simulator"]["workload"],
        "hit": s["cache_hit_fraction"],
        "ttft_mean": s["ttft_ms"]["mean"],
        "ttft_p50": s["ttft_ms"]["p50"],
        "ttft_p99": s["ttft_ms"]["p99"],
        "tpot_mean": s["tpot_ms"]["mean"],
        "e2e_p50": s["e2e_ms"]["p50"],
        "throughput": s["output_throughput"],
        "completed": s["completed"],
        "failed": s["failed"],
        "max_share": max(requests) / (sum(requests) / len(requests)) if sum(requests) else 0.0,
        "busy_max": max(busy),
        "busy_mean": sum(busy) / len(busy),
        "requests_per_te": sorted(requests, reverse=True),
        "reasons": data["routing_reasons"],
        "steps": data["simulator"]["num_steps"],
        "simulated_s": data["simulator"]["simulated_s"],
    }


def table(rows: list[dict]) -> str:
    head = (
        "| TEs | policy | hit rate | TTFT p50 (ms) | TTFT p99 (ms) | TTFT mean (ms) | TPOT mean (ms) "
        "| output tok/s | max/mean requests per TE | busiest TE |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['tes']} | {r['label']} | {r['hit']:.3f} | {r['ttft_p50']:,.0f} | {r['ttft_p99']:,.0f} "
            f"| {r['ttft_mean']:,.0f} | {r['tpot_mean']:.1f} | {r['throughput']:,.0f} | {r['max_share']:.2f} "
            f"| {r['busy_max']:.2f} |"
        )
    return "\n".join(lines)


def report(out: Path, tes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    routing = {}
    for n in tes:
        for p in POLICIES:
            case = load_case(out, f"routing-{n}-{p}")
            if case is not None:
                case["label"] = p
                routing[(n, p)] = case
    if routing:
        print("### Routing policies (default multi-turn workload)\n")
        print(table([routing[k] for k in sorted(routing)]))
        print()
        for k in sorted(routing):
            print(f"- `{routing[k]['command']}`")
        print()
        counts = sorted({n for n, _ in routing})
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for p in POLICIES:
            xs = [n for n in counts if (n, p) in routing]
            axes[0].plot(xs, [routing[(n, p)]["hit"] for n in xs], marker="o", label=p)
            axes[1].plot(xs, [routing[(n, p)]["ttft_p50"] for n in xs], marker="o", label=p)
            axes[2].plot(xs, [routing[(n, p)]["ttft_p99"] for n in xs], marker="o", label=p)
        for ax, title in zip(axes, ("prefix-cache hit rate", "TTFT p50 (ms)", "TTFT p99 (ms)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.set_xlabel("TEs")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[1].set_yscale("log")
        axes[2].set_yscale("log")
        axes[0].legend()
        fig.suptitle(
            "deepflow sim: routing policies, multi-turn (8 system prompts), 70% of modelled capacity"
        )
        fig.tight_layout()
        fig.savefig(IMG / "sim_routing_policies.png", dpi=100)
        plt.close(fig)

    hot = {}
    for n in tes:
        for name in HOTSPOT_CASES:
            case = load_case(out, f"hotspot-{n}-{name}")
            if case is not None:
                case["label"] = name.replace("_", " ")
                hot[(n, name)] = case
    if hot:
        print("### Hot-spot guard (shared-prefix, 32 prefixes, Zipf 1.2)\n")
        print(table([hot[k] for k in sorted(hot, key=lambda k: (k[0], list(HOTSPOT_CASES).index(k[1])))]))
        print()
        for k in hot:
            print(f"- `{hot[k]['command']}`")
        print()
        n = max(n for n, _ in hot)
        fig, axes = plt.subplots(1, 2, figsize=(13, 4))
        for name in HOTSPOT_CASES:
            case = hot.get((n, name))
            if case is None:
                continue
            axes[0].plot(
                range(1, len(case["requests_per_te"]) + 1), case["requests_per_te"], label=case["label"]
            )
        axes[0].set_xlabel("TE (by requests routed, descending)")
        axes[0].set_ylabel("requests routed")
        axes[0].set_title(f"{n} TEs: requests per TE")
        axes[0].legend()
        names = [name for name in HOTSPOT_CASES if (n, name) in hot]
        x = range(len(names))
        axes[1].bar([i - 0.2 for i in x], [hot[(n, k)]["ttft_p50"] for k in names], 0.4, label="TTFT p50")
        axes[1].bar([i + 0.2 for i in x], [hot[(n, k)]["ttft_p99"] for k in names], 0.4, label="TTFT p99")
        axes[1].set_xticks(list(x), [hot[(n, k)]["label"] for k in names])
        axes[1].set_yscale("log")
        axes[1].set_ylabel("ms")
        axes[1].legend()
        for i, k in enumerate(names):
            axes[1].text(
                i, hot[(n, k)]["ttft_p99"], f"hit {hot[(n, k)]['hit']:.2f}", ha="center", va="bottom"
            )
        fig.suptitle("deepflow sim: the hot-spot guard under Zipf(1.2) prefix popularity")
        fig.tight_layout()
        fig.savefig(IMG / "sim_hotspot_guard.png", dpi=100)
        plt.close(fig)
    summary = {v["name"]: v for v in [*routing.values(), *hot.values()]}
    (IMG / "sim_studies.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", choices=("routing", "hotspot", "report"))
    parser.add_argument("--tes", type=int, nargs="+", default=None)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("-j", "--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/deepflow-sim-studies"))
    args = parser.parse_args()
    if args.study == "routing":
        run_all(routing_cases(args.tes or [8, 16, 32, 64], args.duration), args.out, args.jobs)
    elif args.study == "hotspot":
        run_all(hotspot_cases(args.tes or [64], args.duration), args.out, args.jobs)
    report(args.out, args.tes or [8, 16, 32, 64])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
