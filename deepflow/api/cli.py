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

from deepflow.api.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_SEQUENCES, APILimits
from deepflow.platform.procs import http_url

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
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="local HF model folder (default: the embedded SmolLM2); repeat to serve several models",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="name clients use (default: the folder's name); one per --model, in order",
    )
    p.add_argument("--config", default=None, help="cluster YAML (models, TEs, policies, ports); see docs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the ready line shows it)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cpu", help="torch device for the engine: cpu, cuda, cuda:1")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "kernels", "torch"],
        help="compute path. kernels: FlowServe's C++ ops (CPU with AVX512-BF16); torch: plain torch ops "
        "(any device); auto (default): kernels where they run (DEEPFLOW_KERNELS=0 turns them off)",
    )
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
        help="require this bearer key on every route but /health (or $DEEPFLOW_API_KEY)",
    )
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without the API key (it shows every tenant's traffic and cache hits)",
    )
    p.add_argument(
        "--max-body-size",
        type=parse_size,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body, e.g. 4MiB; larger ones are refused with 413 before parsing",
    )
    p.add_argument(
        "--max-sequences-per-request",
        type=_positive_int,
        default=DEFAULT_MAX_SEQUENCES,
        help="cap on prompts x n in one request (400 above)",
    )
    p.add_argument("--no-async-scheduling", action="store_true", help="plan each step after the last one")
    p.add_argument(
        "--async-max-step-tokens",
        type=int,
        default=None,
        help="steps of more tokens (prefills) are collected before the next is planned, so arrivals join the "
        "next step [unset: always overlap]",
    )
    p.add_argument(
        "--tes",
        type=_non_negative_int,
        default=None,
        help="colocated task executors (engine processes) per model [1; 0 with --pd: disaggregated only]",
    )
    p.add_argument(
        "--pd",
        default=None,
        metavar="P:D",
        help="serve each model disaggregated: P prefill and D decode TEs (e.g. 1:1); with --tes N too, N "
        "colocated ones beside them, and --router decides per request (fixed prefers colocated unless "
        "--router-param prefer=disaggregated|alternate)",
    )
    p.add_argument(
        "--router",
        default="fixed",
        help="how a request is split across a model's groups (colocated or prefill+decode): fixed "
        "(prefer=colocated|disaggregated|alternate when both exist) or one the policies add",
    )
    p.add_argument(
        "--router-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a router setting, e.g. prefer=alternate (values are YAML scalars); repeatable",
    )
    p.add_argument(
        "--kv-transfer-mode",
        default="by_request",
        choices=["by_request", "by_layer"],
        help="disaggregated KV hand-over: after the prefill, or each layer as soon as it is written",
    )
    p.add_argument(
        "--policy",
        default="combined",
        choices=["round_robin", "least_load", "locality", "combined"],
        help="how a job executor routes requests among a model's TEs",
    )
    p.add_argument(
        "--jes",
        type=_positive_int,
        default=2,
        help="job executors (HTTP processes) sharing the port; a second one serves while one restarts",
    )
    p.add_argument(
        "--tokenizer-workers",
        type=_non_negative_int,
        default=None,
        help="tokenizer processes per model in each job executor (default: 0 below 8 cores, else up to 4)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="no platform: one HTTP process over one engine process (the plain server)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    p.add_argument("--shutdown-timeout", type=int, default=10, help="seconds in-flight requests get on stop")
    p.set_defaults(func=cmd_serve)


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """`--api-key` wins over $DEEPFLOW_API_KEY; an empty value means no authentication."""
    return args.api_key or os.environ.get("DEEPFLOW_API_KEY") or None


async def _announce_ready(server: Any, host: str, name: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]  # the real one when --port 0
    logger.info("DeepFlow ready: %s (model %s)", http_url(host, port), name)


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


def engine_config(args: argparse.Namespace, model: str | None) -> Any:
    """The EngineConfig the engine flags describe, for `model`."""
    from deepflow import EngineConfig

    config = EngineConfig(
        model=model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        async_scheduling=not args.no_async_scheduling,
        async_max_step_tokens=(
            EngineConfig.async_max_step_tokens
            if args.async_max_step_tokens is None
            else args.async_max_step_tokens
            if args.async_max_step_tokens > 0
            else None
        ),
        enable_prefix_caching=not args.no_prefix_caching,
        max_context_tokens=args.max_context_tokens,
        device=args.device,
        backend=args.backend,
    )
    if args.kv_cache_memory is not None:
        config.kv_cache_memory = args.kv_cache_memory
    if args.host_cache_memory is not None:
        config.host_cache_memory = args.host_cache_memory
    return config


def api_limits(args: argparse.Namespace, base: APILimits | None = None) -> APILimits:
    """The HTTP edge's limits: each flag that differs from its default wins over `base` (the --config
    file's `api:` section), so a file's limits hold unless the command line says otherwise."""
    base = base or APILimits()

    def pick(flag: int, default: int, configured: int) -> int:
        return configured if flag == default else flag

    return APILimits(
        max_body_bytes=pick(args.max_body_size, DEFAULT_MAX_BODY_BYTES, base.max_body_bytes),
        max_sequences=pick(args.max_sequences_per_request, DEFAULT_MAX_SEQUENCES, base.max_sequences),
        metrics_public=base.metrics_public or args.metrics_public,
    )


def build_spec(args: argparse.Namespace) -> Any:
    """The ClusterSpec of `deepflow serve`: from --config, or one model per --model (the embedded one if
    none), each with --tes TEs routed by --policy."""
    from deepflow.engine.kv_transfer import KVMode
    from deepflow.platform.spec import (
        ClusterSpec,
        KVTransferSpec,
        ModelSpec,
        load_config,
        parse_pd,
        served_name,
    )

    if args.config is not None:
        spec = load_config(args.config, parse_size)
        spec.log_level = args.log_level
        spec.api = api_limits(args, spec.api)
        spec.validate()
        return spec
    models = args.model or [None]
    names = args.served_model_name or []
    if len(names) > len(models):
        raise ValueError(f"{len(names)} --served-model-name for {len(models)} --model")
    prefill, decode = parse_pd(args.pd) if args.pd is not None else (0, 0)
    # --pd alone serves disaggregated only; --tes N beside it adds N colocated TEs.
    colocated = args.tes if args.tes is not None else (0 if args.pd is not None else 1)
    router_params = router_params_of(args.router_param)
    specs = []
    for i, model in enumerate(models):
        config = engine_config(args, model)
        name = served_name(config, names[i] if i < len(names) else None)
        specs.append(
            ModelSpec(
                name=name,
                engine=config,
                tes=colocated,
                prefill_tes=prefill,
                decode_tes=decode,
                policy=args.policy,
                router=args.router,
                router_params=dict(router_params),
                kv_transfer=KVTransferSpec(mode=KVMode(args.kv_transfer_mode)),
            )
        )
    spec = ClusterSpec(
        models=specs,
        host=args.host,
        port=args.port,
        job_executors=args.jes,
        tokenizer_workers=args.tokenizer_workers,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        api=api_limits(args),
    )
    spec.validate()
    return spec


def router_params_of(items: list[str]) -> dict[str, Any]:
    """`--router-param KEY=VALUE` items -> {key: value}, each value read as a YAML scalar (1, 0.5, true)."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--router-param takes KEY=VALUE, got {item!r}")
        params[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return params


def cmd_serve(args: argparse.Namespace) -> int:
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(min(logging.INFO, logging.getLevelName(level)))
    try:
        spec = build_spec(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"deepflow: error: {exc}", file=sys.stderr)
        return 2
    if args.standalone:
        return serve_standalone(args, spec)
    from deepflow.platform.launcher import Launcher

    try:
        launcher = Launcher(spec, resolve_api_key(args))
    except OSError as exc:  # e.g. the port is in use
        print(f"deepflow: error: cannot listen on {spec.host}:{spec.port}: {exc}", file=sys.stderr)
        return 1
    return launcher.run()


def serve_standalone(args: argparse.Namespace, spec: Any) -> int:
    """The plain server: this process serves HTTP over one engine process (no CM, no routing)."""
    import uvicorn

    import deepflow
    from deepflow.api.server import build_app
    from deepflow.engine.async_llm import EngineDeadError

    if len(spec.models) != 1 or spec.models[0].groups() != [("colocated", 1)]:
        print("deepflow: error: --standalone serves one model on one engine", file=sys.stderr)
        return 2
    model = spec.models[0]
    name = model.name
    logger.info("starting DeepFlow for model %s on %s", name, http_url(args.host, args.port))
    try:
        engine = deepflow.AsyncLLM(model.engine, None, model_name=name)
    except EngineDeadError as exc:
        print(f"deepflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the model loads: the engine process is a daemon and goes too
        return 130
    from deepflow.api.fine_tuning import FineTuningService
    from deepflow.weights.embedded import default_home

    app = build_app(
        engine, name, resolve_api_key(args), limits=spec.api, fine_tuning=FineTuningService(default_home())
    )
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
