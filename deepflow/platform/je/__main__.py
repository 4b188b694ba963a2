"""`python -m deepflow.platform.je`: one job executor, started (and restarted) by `deepflow serve`.

It serves HTTP on the listening socket the launcher bound and passed down, so a restarted JE, or several,
accept on the same port (connections wait in the kernel's backlog meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from deepflow.platform.procs import setup_logging, watch_lifeline

logger = logging.getLogger("deepflow.platform.je")


async def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from deepflow.api.contexts import SQLiteContextRegistry
    from deepflow.api.fine_tuning import FineTuningService
    from deepflow.api.server import build_app
    from deepflow.platform.je.executor import JobExecutor
    from deepflow.platform.spec import ClusterSpec
    from deepflow.weights.embedded import default_home

    spec = ClusterSpec.decode(args.spec)
    executor = JobExecutor(spec, args.je_id, args.run_dir)
    try:
        await executor.start()
        contexts = SQLiteContextRegistry(args.run_dir / "contexts.db")  # shared by the JEs, outlives them
        contexts.locator = executor.context_location  # GET /v1/contexts/{id} says which TE pins it
        app = build_app(
            dict(executor.engines),
            api_key=os.environ.get("DEEPFLOW_API_KEY") or None,
            platform=executor,
            contexts=contexts,
            # Files and fine-tuning jobs live under $DEEPFLOW_HOME, shared by the JEs (and their restarts).
            fine_tuning=FineTuningService(default_home()),
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=spec.log_level,
                timeout_graceful_shutdown=spec.shutdown_timeout,
            )
        )
        listener = socket.socket(fileno=args.listen_fd)
        _serving.set()
        await server.serve(sockets=[listener])
    finally:
        executor.shutdown()  # closes the TE sockets and the tokenizer workers
    return 0


_serving = threading.Event()


def _on_sigterm(*_: object) -> None:
    """Before uvicorn serves: stop now. After it stopped: absorb the SIGTERM it re-raises on exit, so the
    cleanup in `serve` still runs (uvicorn's own handler drains the streams while it serves)."""
    if not _serving.is_set():
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepflow.platform.je")
    p.add_argument("--spec", required=True, help="ClusterSpec as JSON")
    p.add_argument("--je-id", required=True)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--listen-fd", required=True, type=int)
    p.add_argument("--lifeline-fd", type=int, default=None)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    setup_logging(args.log_level, f"JE-{args.je_id}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher stops us with SIGTERM, in order
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Launcher gone: stop like on SIGTERM (uvicorn's handler drains, then exits).
    watch_lifeline(args.lifeline_fd, lambda: os.kill(os.getpid(), signal.SIGTERM))
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
