"""Decode step time of a batch sharing a cached prompt prefix, cascade attention on vs off in one run.

    .venv/bin/python benchmarks/decode_shared_prefix.py [--batch 8] [--prefix-lens 32 1024] [--steps 40]

For each prefix length: `batch` requests = the prefix + a unique 32-token suffix, greedy, `steps` output
tokens; the median wall time of the engine steps that only decode is reported with the cascade (blocks all
decodes share attended once) and without it (each sequence gathers its own copy), on the embedded model in
bf16.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from deepflow import LLM, SamplingParams
from deepflow.engine.request import EngineCoreRequest


def decode_step_ms(llm: LLM, prefix_len: int, batch: int, steps: int, tag: str) -> float:
    core = llm.core
    core.cache.reset()  # every configuration starts cold: the same prefills, then pure decode steps
    prefix = [100 + i % 3000 for i in range(prefix_len)]
    for i in range(batch):
        core.add_request(
            EngineCoreRequest(
                request_id=f"{tag}-{i}",
                prompt_token_ids=prefix + [7000 + i] * 32,
                sampling_params=SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True),
            )
        )
    times = []
    while core.has_work():
        running = core.scheduler.running
        decoding = len(running) == batch and all(
            r.num_computed_tokens >= len(r.prompt_token_ids) for r in running
        )
        started = time.perf_counter()
        core.step()
        if decoding and len(core.scheduler.running) == batch:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure(prefix_len: int, batch: int, steps: int, cascade: bool) -> float:
    llm = LLM(dtype="bfloat16", skip_tokenizer_init=True)
    if not cascade:
        llm.core.runner.cascade_min_saved_blocks = 1 << 30
    try:
        return decode_step_ms(llm, prefix_len, batch, steps, "run")
    finally:
        llm.shutdown()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefix-lens", type=int, nargs="+", default=[32, 1024])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a single measurement
    args = parser.parse_args()
    if args.one:
        print(measure(args.prefix_lens[0], args.batch, args.steps, args.one == "on"))
        return
    # Each measurement in a fresh process: the step time of the plain path was seen to depend on what the
    # process ran before (84 ms per step first thing, 42 ms after a cascade run): no run precedes another.
    print("| shared prefix (tokens) | batch | cascade on (ms/step) | off (ms/step) | off / on |")
    print("|---:|---:|---:|---:|---:|")
    for prefix_len in args.prefix_lens:
        result = {}
        for mode in ("on", "off"):
            cmd = [sys.executable, __file__, "--one", mode, "--prefix-lens", str(prefix_len)]
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result[mode] = float(out.split()[-1])
        on, off = result["on"], result["off"]
        print(f"| {prefix_len} | {args.batch} | {on:.1f} | {off:.1f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
