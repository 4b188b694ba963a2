"""`python -m deepflow.platform.te`: one task executor, started by the cluster manager."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import msgspec

from deepflow.engine.config import EngineConfig
from deepflow.platform.procs import setup_logging, stop_on_signals, watch_lifeline

logger = logging.getLogger("deepflow.platform.te")

LIFELINE_GRACE_SECONDS = 30.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepflow.platform.te")
    p.add_argument("--te-id", required=True)
    p.add_argument("--incarnation", type=int, required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--engine-config", required=True, help="EngineConfig as JSON")
    p.add_argument("--cm-address", required=True)
    p.add_argument("--address", required=True, help="where this TE listens for job executors")
    p.add_argument("--lifeline-fd", type=int, default=None)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    setup_logging(args.log_level, f"TE-{args.te_id}")
    from deepflow.platform.te.shell import TEShell

    shell: TEShell | None = None
    stop_requested = False

    def stop() -> None:
        nonlocal stop_requested
        stop_requested = True
        if shell is None:  # still loading the model: nothing to drain
            os._exit(0)
        shell.stop()

    def lifeline_lost() -> None:
        if shell is None:  # still loading the model: nothing to drain
            os._exit(0)
        shell.stop()
        # The launcher is gone: nobody would kill a TE whose step hangs. Give the step a while, then go.
        threading.Timer(LIFELINE_GRACE_SECONDS, os._exit, args=(1,)).start()

    stop_on_signals(stop)
    watch_lifeline(args.lifeline_fd, lifeline_lost)
    config = msgspec.json.decode(args.engine_config, type=EngineConfig)
    try:
        shell = TEShell(args.te_id, args.incarnation, args.model_name, config, args.cm_address, args.address)
    except Exception:
        logger.exception("TE %s failed to start", args.te_id)
        return 1
    if stop_requested:
        shell.stop()
    return shell.serve()


if __name__ == "__main__":
    sys.exit(main())
