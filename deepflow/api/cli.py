"""`deepflow serve`: build the engine, wrap it in the OpenAI-compatible app, run it under uvicorn.

Shutdown: uvicorn turns the first Ctrl-C / SIGTERM into a graceful stop (in-flight streams get
`--shutdown-timeout` seconds, then are cancelled, which aborts their requests); we then stop the engine,
whose core process would otherwise linger, and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from typing import Any

# Lifecycle lines (starting, ready, stopped) show at every --log-level: scripts wait for the ready line.
logger = logging.getLogger("deepflow.serve")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """'1GiB', '512MiB', '1.5G' (binary), '500MB' (decimal) or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 1GiB, 512MiB or a number of bytes")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0 or (size == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _size_or_zero(text: str) -> int:
    return parse_size(text, allow_zero=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `serve` subcommand to the `deepflow` parser."""
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the ready line shows it)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-num-seqs", type=_positive_int, default=128)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
    p.add_argument("--max-model-len", type=_positive_int, default=None, help="default: the model's, capped")
    p.add_argument(
        "--kv-cache-memory", type=parse_size, default=None, help="KV pool size, e.g. 1GiB (default: 1GiB)"
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="never reuse KV across requests")
    p.add_argument(
        "--host-cache-memory",
        type=_size_or_zero,
        default=None,
        help="host-memory tier for evicted prefix-cache blocks, e.g. 4GiB; 0: none (default: the engine's)",
    )
    p.add_argument(
        "--max-context-tokens",
        type=_non_negative_int,
        default=None,
        help="cap on tokens pinned by /v1/contexts (default: half the KV pool)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require this bearer key on /v1/* and admin routes (or $DEEPFLOW_API_KEY)",
    )
    p.add_argument("--no-async-scheduling", action="store_true", help="plan each step after the last one")
    p.add_argument(
        "--tes", type=_positive_int, default=1, help="task executors (engine processes) serving the model"
    )
    p.add_argument(
        "--policy",
        default="combined",
        choices=["round_robin", "least_load", "locality", "combined"],
        help="how requests are routed among the TEs (with --tes > 1)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    p.add_argument("--shutdown-timeout", type=int, default=10, help="seconds in-flight requests get on stop")
    p.set_defaults(func=cmd_serve)


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """`--api-key` wins over $DEEPFLOW_API_KEY; an empty value means no authentication."""
    return args.api_key or os.environ.get("DEEPFLOW_API_KEY") or None


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _announce_ready(server: Any, host: str, name: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]  # the real one when --port 0
    logger.info("DeepFlow ready: %s (model %s)", _url(host, port), name)


async def _serve(server: Any, engine: Any, host: str, name: str) -> int:
    """Run uvicorn until it stops; the engine is shut down whatever ended it. Returns the exit code."""
    announcer = asyncio.create_task(_announce_ready(server, host, name))
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits on startup failures such as a port in use
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        announcer.cancel()
        logger.info("shutting the engine down")
        engine.shutdown()
        logger.info("DeepFlow stopped")
    return 0


def _te_group(config: Any, num_tes: int, policy: str) -> Any:
    """None (AsyncLLM starts its one engine process) or a routed group of `num_tes` engine processes.

    Until the cluster manager lands, the job executor's client starts the TEs itself."""
    if num_tes == 1:
        return None
    from deepflow.engine.core_client import MPEngineCoreClient
    from deepflow.platform.je.policies import make_policy
    from deepflow.platform.je.routing_client import RoutingCoreClient

    config.kv_events = True
    config.num_threads = config.num_threads or max(1, (os.cpu_count() or 1) // num_tes)
    clients: dict[str, Any] = {}
    try:
        for i in range(num_tes):
            clients[f"te-{i}"] = MPEngineCoreClient(config)
    except BaseException:
        for client in clients.values():
            client.shutdown()
        raise
    logger.info("%d TEs ready; routing policy %s", num_tes, policy)
    return RoutingCoreClient(clients, make_policy(policy), block_size=config.block_size)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from deepflow import AsyncLLM, EngineConfig
    from deepflow.api.server import build_app
    from deepflow.engine.async_llm import EngineDeadError

    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(min(logging.INFO, logging.getLevelName(level)))
    api_key = resolve_api_key(args)
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        async_scheduling=not args.no_async_scheduling,
        enable_prefix_caching=not args.no_prefix_caching,
        max_context_tokens=args.max_context_tokens,
    )
    if args.kv_cache_memory is not None:
        config.kv_cache_memory = args.kv_cache_memory
    if args.host_cache_memory is not None:
        config.host_cache_memory = args.host_cache_memory
    name = args.served_model_name or config.model_path().name
    logger.info("starting DeepFlow for model %s on %s", name, _url(args.host, args.port))
    try:
        engine = AsyncLLM(config, _te_group(config, args.tes, args.policy), model_name=name)
    except EngineDeadError as exc:
        print(f"deepflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the model loads: the engine process is a daemon and goes too
        return 130
    app = build_app(engine, name, api_key)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    )
    # uvicorn handles the signal while it serves, then re-raises it once it has stopped; these no-op
    # handlers absorb that re-raise so the engine is shut down below instead of the process dying first.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return asyncio.run(_serve(server, engine, args.host, name))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
