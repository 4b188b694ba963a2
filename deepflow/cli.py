"""The `deepflow` command line: model preparation and one-shot generation (serving comes with the server)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from deepflow import __version__


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    parser.add_argument("--backend", default="auto", choices=["auto", "kernels", "torch"])
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument(
        "--no-async-scheduling", action="store_true", help="plan each step after the last one"
    )


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deepflow.weights.embedded import prepare_embedded_model

    path = prepare_embedded_model(Path(args.home) if args.home else None, progress=True, force=args.force)
    print(path)
    return 0


async def _stream(args: argparse.Namespace) -> int:
    from deepflow import AsyncLLM, EngineConfig, SamplingParams

    engine = AsyncLLM(
        in_process=True,
        config=EngineConfig(
            model=args.model,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            async_scheduling=not args.no_async_scheduling,
            device=args.device,
            backend=args.backend,
        ),
    )
    try:
        prompt: str | list[int]
        if args.raw:
            prompt = args.prompt
        else:
            prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        async for output in engine.generate(prompt, params):
            sys.stdout.write(output.outputs[0].delta_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.shutdown()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_stream(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepflow", description="DeepFlow: serverless LLM serving")
    parser.add_argument("--version", action="version", version=f"deepflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model management").add_subparsers(
        dest="model_command", required=True
    )
    prepare = model.add_parser("prepare", help="convert the embedded SmolLM2 GGUF into an HF folder")
    prepare.add_argument("--home", default=None, help="default: $DEEPFLOW_HOME or ~/.cache/deepflow")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    prepare.set_defaults(func=cmd_model_prepare)

    generate = sub.add_parser("generate", help="answer one prompt, streaming the text")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    _add_engine_args(generate)
    generate.set_defaults(func=cmd_generate)

    # Each subsystem registers its own subcommands (they import their heavy modules lazily).
    from deepflow.api.cli import register as register_serve
    from deepflow.bench.cli import register as register_bench
    from deepflow.sim.cli import register as register_sim
    from deepflow.tenants.cli import register as register_tenants

    register_serve(sub)
    register_bench(sub)
    register_sim(sub)
    register_tenants(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"deepflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
