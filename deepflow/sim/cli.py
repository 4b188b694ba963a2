"""`deepflow sim run` and `deepflow sim calibrate` (argparse only here; the simulator loads when run)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_RUN = """\
Simulate a DeepFlow cluster: the real scheduler, RTC and JE routing policies over simulated TEs whose step
times come from a cost model fitted to the real engine. Without --workload (or --trace): multi-turn
conversations over a few shared system prompts, Poisson arrivals at ~70%% of the cluster's modelled
capacity. Prints `deepflow bench serve`'s report."""

POLICY_NAMES = ("combined", "round_robin", "least_load", "locality")


def _home() -> Path:
    env = os.environ.get("DEEPFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepflow"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `sim` subcommand to the `deepflow` parser."""
    sim = sub.add_parser("sim", help="cluster simulator").add_subparsers(dest="sim_command", required=True)
    p = sim.add_parser(
        "run",
        help="simulate a cluster",
        description=_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--tes", type=int, default=8, help="task executors (default 8)")
    cluster.add_argument(
        "--policy", default="combined", type=lambda s: s.replace("-", "_"), choices=POLICY_NAMES
    )
    cluster.add_argument(
        "--policy-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy parameter (repeatable), e.g. hot_spot_factor=1e9 turns combined's hot-spot guard off",
    )
    cluster.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cost model JSON (default: calibrated "
        "next to the model if `deepflow sim calibrate` ran, else the shipped default)",
    )
    cluster.add_argument(
        "--model", default=None, help="HF folder whose calibration to use (default: embedded)"
    )
    cluster.add_argument("--max-num-seqs", type=int, default=128)
    cluster.add_argument("--max-num-batched-tokens", type=int, default=2048)
    cluster.add_argument("--block-size", type=int, default=16)
    cluster.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV pool per TE (GiB)")
    cluster.add_argument("--host-cache-gib", type=float, default=1.0, help="host tier per TE (GiB)")
    cluster.add_argument("--no-async-scheduling", action="store_true")
    cluster.add_argument("--no-prefix-caching", action="store_true")

    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=("random", "shared-prefix", "multi-turn"), default=None)
    work.add_argument("--trace", type=Path, default=None, help="replay a JSON trace (or a bench --json file)")
    work.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals (default 600)")
    work.add_argument(
        "--rate", type=float, default=None, help="sessions/s (default: 70%% of the modelled capacity)"
    )
    work.add_argument("--load", type=float, default=0.7, help="without --rate: fraction of capacity")
    work.add_argument("--input-len", type=int, default=256)
    work.add_argument("--output-len", type=int, default=128)
    work.add_argument("--prefix-len", type=int, default=1024, help="shared prefix / system prompt tokens")
    work.add_argument(
        "--num-prefixes",
        type=int,
        default=None,
        help="distinct shared prefixes (default: 8 for multi-turn, else 1)",
    )
    work.add_argument(
        "--prefix-zipf",
        type=float,
        default=0.0,
        help="prefix popularity: 0 uniform, s > 0 Zipf (the k-th prefix ~ 1/(k+1)^s)",
    )
    work.add_argument("--num-turns", type=int, default=4)
    work.add_argument("--think-time", type=float, default=0.0, help="seconds between a turn and the next")
    work.add_argument("--seed", type=int, default=0)

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write the report, config and every request")
    out.add_argument("--plot", type=Path, default=None, help="write a PNG of the run (matplotlib)")
    out.add_argument("--drain", type=float, default=600.0, help="seconds requests may run after arrivals end")
    out.add_argument(
        "--itl-sample-every",
        type=int,
        default=None,
        help="keep inter-token gaps of 1 request in N (default: about 20,000 requests kept)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_sim_run)

    c = sim.add_parser("calibrate", help="fit the cost model to the real engine (runs the model)")
    c.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    c.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="the engine's threads (default 1: a TE per core, as the CM places TEs here)",
    )
    c.add_argument("--backend", default="auto", choices=["auto", "kernels", "torch"])
    c.add_argument("--quick", action="store_true", help="a smaller grid (~20 s)")
    c.add_argument("--repeats", type=int, default=1, help="measured passes over the grid (after a warm-up)")
    c.add_argument("--out", type=Path, default=None, help="default: the model folder")
    c.set_defaults(func=cmd_sim_calibrate)


def resolve_profile(profile: Path | None, model: str | None, dtype: str = "bfloat16") -> Path | None:
    """--profile; else the calibration next to the model (embedded: under $DEEPFLOW_HOME); else None (the
    shipped default)."""
    if profile is not None:
        return profile
    folder = Path(model).expanduser() if model else _home() / "models" / "SmolLM2-135M-Instruct"
    path = folder / f"deepflow-sim-profile-{dtype}.json"
    if path.exists():
        return path
    if model:
        raise FileNotFoundError(f"no calibration for {folder}: run `deepflow sim calibrate --model {model}`")
    return None


def parse_policy_params(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` pairs; values are ints or floats where they parse as such."""
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--policy-param wants KEY=VALUE, not {item!r}")
        parsed: object = value
        for kind in (int, float):
            try:
                parsed = kind(value)
                break
            except ValueError:
                continue
        params[key.strip().replace("-", "_")] = parsed
    return params


def cmd_sim_run(args: argparse.Namespace) -> int:
    from deepflow.sim.costmodel import load_profile
    from deepflow.sim.report import format_report
    from deepflow.sim.simulation import SimConfig, Simulation, default_engine_config, estimate_capacity
    from deepflow.sim.workload import TraceWorkload, WorkloadSpec

    if args.tes < 1:
        raise ValueError("--tes must be >= 1")
    profile_path = resolve_profile(args.profile, args.model)
    profile = load_profile(profile_path)
    engine = default_engine_config(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory=int(args.kv_cache_gib * (1 << 30)),
        host_cache_memory=int(args.host_cache_gib * (1 << 30)),
        async_scheduling=not args.no_async_scheduling,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    workload: object
    expected_requests: float
    if args.trace is not None:
        workload = TraceWorkload(args.trace, seed=args.seed)
        expected_requests = 20_000.0
    else:
        kind = args.workload or "multi-turn"
        spec = WorkloadSpec(
            kind=kind,
            duration_s=args.duration,
            input_len=args.input_len,
            output_len=args.output_len,
            prefix_len=args.prefix_len,
            num_prefixes=args.num_prefixes or (8 if kind == "multi-turn" else 1),
            num_turns=args.num_turns,
            prefix_zipf=args.prefix_zipf,
            think_time_s=args.think_time,
            seed=args.seed,
        )
        if args.rate is None:
            capacity = estimate_capacity(spec, engine, profile, args.tes)
            spec.rate = args.load * capacity
            if not args.quiet:
                print(
                    f"modelled capacity {capacity:.3f} sessions/s; rate {spec.rate:.3f}/s ({args.load:.0%})",
                    file=sys.stderr,
                )
        else:
            spec.rate = args.rate
        spec.validate()
        workload = spec
        expected_requests = spec.rate * spec.duration_s * spec.turns_per_session
    sample = args.itl_sample_every or max(1, int(expected_requests // 20_000))
    config = SimConfig(
        num_tes=args.tes,
        policy=args.policy,
        policy_params=parse_policy_params(args.policy_param),
        engine=engine,
        profile=profile,
        drain_s=args.drain,
        itl_sample_every=sample,
        sample_interval_s=max(1.0, min(60.0, args.duration / 200)),
    )
    started = time.perf_counter()
    sim = Simulation(config, workload)  # type: ignore[arg-type]
    if not args.quiet:
        sim.progress = lambda t: print(
            f"\rsimulated {t:,.0f} s, wall {time.perf_counter() - started:,.1f} s", end="", file=sys.stderr
        )
    result = sim.run()
    result.wall_s = time.perf_counter() - started
    if not args.quiet:
        print(file=sys.stderr)
    print(format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict()) + "\n", encoding="utf-8")
    if args.plot is not None:
        from deepflow.sim.plot import plot_result

        plot_result(result, args.plot)
    return 0 if result.summary.completed else 1


def cmd_sim_calibrate(args: argparse.Namespace) -> int:
    from deepflow.engine.config import EngineConfig
    from deepflow.sim.calibrate import calibrate, default_profile_path

    config = EngineConfig(
        model=args.model, dtype=args.dtype, num_threads=args.num_threads, backend=args.backend
    )
    profile = calibrate(
        config, quick=args.quick, repeats=args.repeats, log=lambda m: print(m, file=sys.stderr)
    )
    out = args.out or default_profile_path(config.model_path(), args.dtype)
    profile.save(out)
    fit = profile.fit
    print(
        f"fitted {fit['samples']} steps: R² {fit['r2']:.4f}, mean abs error {fit['mean_abs_pct_error']:.1f}%"
    )
    print("coefficients (s): " + ", ".join(f"{k} {v:.3g}" for k, v in profile.coefficients.items()))
    print(f"copy per KV block: {profile.copy_seconds_per_block * 1e6:.1f} us")
    print(out)
    return 0
