"""`python -m deepflow.platform.cluster`: the cluster manager, started (and restarted) by `deepflow serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepflow.platform.procs import setup_logging, stop_on_signals, watch_lifeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepflow.platform.cluster")
    p.add_argument("--spec", required=True, help="ClusterSpec as JSON")
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--lifeline-fd", type=int, default=None)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    setup_logging(args.log_level, "CM")
    from deepflow.platform.cluster.manager import ClusterManager
    from deepflow.platform.spec import ClusterSpec

    manager = ClusterManager(ClusterSpec.decode(args.spec), args.run_dir, args.lifeline_fd, args.log_level)
    stop_on_signals(manager.stop)
    watch_lifeline(args.lifeline_fd, manager.stop)
    return manager.run()


if __name__ == "__main__":
    sys.exit(main())
