"""How fast the simulator runs: one `deepflow sim run` in-process, timed by CPU (user + sys) and wall, with
the machine's load average before and after (the machine may be shared: CPU time is the steadier number).

    python benchmarks/sim_speed.py --tes 64 --duration 3600          # the issue's target: < 2 minutes
    python benchmarks/sim_speed.py --tes 8 --duration 600 --profile-out /tmp/sim.prof   # where the time goes

Prints one JSON line: simulated seconds, TE steps, CPU and wall seconds, CPU µs per TE step, load averages,
and the run's headline numbers (so a faster run can be checked to decide the same).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tes", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--policy", default="combined")
    parser.add_argument("--drain", type=float, default=600.0)
    parser.add_argument("--profile-out", type=Path, default=None, help="write a cProfile of the run here")
    args = parser.parse_args()

    import contextlib
    import io
    import re

    from deepflow.sim.cli import register

    # Exactly `deepflow sim run --tes N --duration D --quiet` (its parser, defaults and code), in-process.
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    argv = ["sim", "run", "--tes", str(args.tes), "--duration", f"{args.duration:g}", "--quiet"]
    argv += ["--policy", args.policy, "--drain", f"{args.drain:g}"]
    run_args = parser.parse_args(argv)
    out = io.StringIO()
    load_before = os.getloadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        if args.profile_out is not None:
            import cProfile

            profiler = cProfile.Profile()
            profiler.runcall(run_args.func, run_args)
            profiler.dump_stats(args.profile_out)
        else:
            run_args.func(run_args)
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    report = out.getvalue()
    print(report, file=sys.stderr)

    def field(pattern: str) -> str | None:
        m = re.search(pattern, report)
        return m.group(1).replace(",", "") if m else None

    steps = int(field(r"\(([\d,]+) TE steps") or 0)
    print(
        json.dumps(
            {
                "tes": args.tes,
                "duration_s": args.duration,
                "command": "deepflow " + " ".join(argv),
                "simulated_s": float(field(r"Simulated \(s\):\s+([\d,.]+)") or 0),
                "steps": steps,
                "cpu_s": round(cpu, 1),
                "wall_s": round(wall, 1),
                "cpu_us_per_step": round(cpu / max(steps, 1) * 1e6, 1),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "hit": field(r"Cache hit fraction:\s+([\d.]+)"),
                "ttft_mean_ms": field(r"TTFT\s+([\d,.]+)"),
                "python": sys.version.split()[0],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
