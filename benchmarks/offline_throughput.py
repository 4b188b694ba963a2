"""Offline generation throughput: deepflow's `LLM.generate` against Hugging Face `model.generate`.

Reproduce (the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/offline_throughput.py --batch-sizes 1 8 32 --markdown

Full form:

    python benchmarks/offline_throughput.py --batch-sizes 1 8 32 --input-len 256 --output-len 128 \
        --dtype bfloat16 [--model PATH] [--engines deepflow hf] [--repeat N] [--json out.json] [--markdown]

For every batch size, `batch` prompts of exactly `input-len` random token ids (fixed seed, ids drawn from
[100, vocab-100)) are completed greedily with exactly `output-len` new tokens each (EOS ignored). Throughput
is output tokens per second of the whole generate call, prefill included:

    tok/s = batch * output_len / wall time of one generate call

Both engines run on the same prompts, interleaved per batch size (deepflow then HF at batch 1, then at the
next batch size, ...) so that machine noise hits both alike; `--repeat N` keeps the best of N runs. HF runs in
a child process: torch ops issued from two threads of one process get two OpenMP teams that oversubscribe
the cores and would slow both. Model loading and one small warm-up generate per engine are not timed. Both
use torch's default intra-op thread count (all cores) unless `--threads` is given.

For deepflow the script also reports the mean decode step time (a step where every scheduled request gets
one token) and the prefill time, measured by wrapping the engine's model-runner `execute` call; for
information only, it reports how far the two engines' greedy outputs agree (bf16 rounding differs between
the two implementations, so agreement below 100% in bf16 is expected; in float32 it should be ~100%).

Without `--model` the embedded SmolLM2-135M-Instruct is used (deepflow prepares its HF folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ENGINES = ("deepflow", "hf")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TOKEN_ID_MARGIN = 100  # prompt ids are drawn from [100, vocab - 100): away from special and padding ids


# -- results -------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One timed generate call."""

    seconds: float
    tok_per_s: float
    decode_step_ms: float | None = None  # deepflow only: mean wall time of a pure-decode step
    prefill_s: float | None = None  # deepflow only: total time of the steps that carried prompt tokens
    num_decode_steps: int | None = None


@dataclass
class EngineResult:
    """All repeats of one engine at one batch size; `best` is the fastest."""

    engine: str
    batch: int
    runs: list[RunResult] = field(default_factory=list)

    @property
    def best(self) -> RunResult:
        return min(self.runs, key=lambda r: r.seconds)


@dataclass
class BatchResult:
    dtype: str
    batch: int
    engines: dict[str, EngineResult] = field(default_factory=dict)
    # Greedy agreement between the engines (None unless both ran): mean common-prefix fraction, and the
    # fraction of sequences whose first generated token matches.
    prefix_agreement: float | None = None
    first_token_agreement: float | None = None

    def tok_per_s(self, engine: str) -> float | None:
        result = self.engines.get(engine)
        return None if result is None else result.best.tok_per_s

    @property
    def ratio(self) -> float | None:
        ours, theirs = self.tok_per_s("deepflow"), self.tok_per_s("hf")
        return None if ours is None or theirs is None else ours / theirs


# -- environment ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(dtypes: Sequence[str]) -> dict[str, Any]:
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "dtypes": list(dtypes),
        "loadavg_at_start": None if load is None else [round(x, 2) for x in load],
    }


def environment_line(env: dict[str, Any]) -> str:
    load = env["loadavg_at_start"]
    return (
        f"CPU: {env['cpu']} ({env['cpu_count']} logical cores), torch {env['torch']} "
        f"({env['torch_threads']} threads), transformers {env['transformers']}, Python {env['python']}, "
        f"dtype {'/'.join(env['dtypes'])}" + ("" if load is None else f", load average at start {load[0]}")
    )


# -- prompts -------------------------------------------------------------------------------------------------


def make_prompts(batch: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`batch` prompts of exactly `input_len` token ids, the same for a given (batch, seed)."""
    low, high = TOKEN_ID_MARGIN, vocab_size - TOKEN_ID_MARGIN
    if high <= low:
        raise ValueError(f"vocab size {vocab_size} is too small for ids in [{low}, {high})")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    return torch.randint(low, high, (batch, input_len), generator=generator).tolist()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- engines -------------------------------------------------------------------------------------------------


class StepTimer:
    """Times every `ModelRunner.execute` call of a deepflow engine, split into decode and prefill steps.

    It replaces the bound method on the runner instance (the engine looks it up per step), so no engine code
    changes; the cost is two `perf_counter` calls per step.
    """

    def __init__(self, runner: Any) -> None:
        self.decode: list[float] = []
        self.prefill: list[float] = []
        inner: Callable[[Any], Any] = runner.execute

        def timed(scheduled: Any) -> Any:
            start = time.perf_counter()
            result = inner(scheduled)
            elapsed = time.perf_counter() - start
            counts = scheduled.num_scheduled_tokens.values()
            if counts:
                (self.decode if all(c == 1 for c in counts) else self.prefill).append(elapsed)
            return result

        runner.execute = timed

    def reset(self) -> None:
        self.decode.clear()
        self.prefill.clear()


class DeepflowEngine:
    name = "deepflow"

    def __init__(
        self,
        model: str | None,
        dtype: str,
        max_batch: int,
        input_len: int,
        output_len: int,
        max_num_batched_tokens: int,
        async_scheduling: bool,
        threads: int | None,
    ) -> None:
        from deepflow import LLM, SamplingParams

        self.llm = LLM(
            model,
            dtype=dtype,
            max_num_seqs=max(max_batch, 1),
            # Room for the whole batch's prompts in one step, so prefill is one batched forward.
            max_num_batched_tokens=max(max_num_batched_tokens, max_batch * input_len),
            max_model_len=input_len + output_len,
            async_scheduling=async_scheduling,
            num_threads=threads,
        )
        self.model_path = str(self.llm.core.model_path)
        self.output_len = output_len
        self.params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        self.warmup_params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        self.timer = StepTimer(self.llm.core.runner)

    def warmup(self, prompts: list[list[int]]) -> None:
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.warmup_params)

    def run(self, prompts: list[list[int]]) -> tuple[RunResult, list[list[int]]]:
        requests = [{"prompt_token_ids": p} for p in prompts]
        self.timer.reset()
        gc.collect()
        start = time.perf_counter()
        outputs = self.llm.generate(requests, self.params)
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        check_lengths(self.name, tokens, len(prompts), self.output_len)
        decode = self.timer.decode
        result = RunResult(
            seconds=seconds,
            tok_per_s=len(prompts) * self.output_len / seconds,
            decode_step_ms=statistics.fmean(decode) * 1e3 if decode else None,
            prefill_s=sum(self.timer.prefill),
            num_decode_steps=len(decode),
        )
        return result, tokens

    def close(self) -> None:
        self.llm.shutdown()


def _hf_worker(conn: Any, model_path: str, dtype: str, threads: int | None) -> None:
    """HF transformers in a process of its own: two engines running torch from different threads of one
    process oversubscribe the cores (one OpenMP team per thread), which would slow both and skew the ratio."""
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=TORCH_DTYPES[dtype]).eval()
    config = model.generation_config
    config.eos_token_id = None  # never stop early: exactly output_len new tokens
    config.pad_token_id = 0
    config.do_sample = False
    conn.send("ready")
    while (message := conn.recv()) is not None:
        prompts, new_tokens = message
        gc.collect()
        input_ids = torch.tensor(prompts, dtype=torch.long)
        start = time.perf_counter()
        with torch.inference_mode():
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )
        seconds = time.perf_counter() - start
        conn.send((seconds, sequences[:, input_ids.shape[1] :].tolist()))


class HFEngine:
    name = "hf"

    def __init__(self, model_path: str, dtype: str, output_len: int, threads: int | None = None) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_hf_worker, args=(child, model_path, dtype, threads), daemon=True
        )
        self._process.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("HF worker failed to start")
        self.output_len = output_len

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        self._conn.send((prompts, new_tokens))
        return self._conn.recv()

    def warmup(self, prompts: list[list[int]]) -> None:
        self._generate(prompts, 8)

    def run(self, prompts: list[list[int]]) -> tuple[RunResult, list[list[int]]]:
        seconds, tokens = self._generate(prompts, self.output_len)
        check_lengths(self.name, tokens, len(prompts), self.output_len)
        return RunResult(seconds=seconds, tok_per_s=len(prompts) * self.output_len / seconds), tokens

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


def check_lengths(engine: str, tokens: list[list[int]], batch: int, output_len: int) -> None:
    if len(tokens) != batch:
        raise RuntimeError(f"{engine}: got {len(tokens)} outputs for {batch} prompts")
    bad = [i for i, t in enumerate(tokens) if len(t) != output_len]
    if bad:
        raise RuntimeError(
            f"{engine}: {len(bad)} of {batch} outputs do not have {output_len} tokens "
            f"(e.g. #{bad[0]}: {len(tokens[bad[0]])})"
        )


# -- benchmark -----------------------------------------------------------------------------------------------


def vocab_size_of(model_path: str) -> int:
    with open(Path(model_path) / "config.json", encoding="utf-8") as handle:
        return int(json.load(handle)["vocab_size"])


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        return str(Path(model).expanduser())
    from deepflow.weights.embedded import prepare_embedded_model

    return str(prepare_embedded_model())


def benchmark_dtype(args: argparse.Namespace, dtype: str, model_path: str) -> list[BatchResult]:
    """Load the engines for one dtype (untimed), warm them up, then time each batch size, interleaved."""
    vocab = vocab_size_of(model_path)
    engines: list[DeepflowEngine | HFEngine] = []
    load_s: dict[str, float] = {}
    for name in args.engines:
        start = time.perf_counter()
        if name == "deepflow":
            engines.append(
                DeepflowEngine(
                    model_path,
                    dtype,
                    max(args.batch_sizes),
                    args.input_len,
                    args.output_len,
                    args.max_num_batched_tokens,
                    not args.sync,
                    args.threads,
                )
            )
        else:
            engines.append(HFEngine(model_path, dtype, args.output_len, args.threads))
        load_s[name] = time.perf_counter() - start
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"[{dtype}] loaded " + ", ".join(f"{n} in {s:.1f}s" for n, s in load_s.items()))

    warmup_prompts = make_prompts(min(2, max(args.batch_sizes)), args.input_len, vocab, args.seed + 1)
    for engine in engines:
        start = time.perf_counter()
        engine.warmup(warmup_prompts)
        log(f"[{dtype}] warmed up {engine.name} in {time.perf_counter() - start:.1f}s")

    results: list[BatchResult] = []
    try:
        for batch in args.batch_sizes:
            prompts = make_prompts(batch, args.input_len, vocab, args.seed)
            row = BatchResult(dtype=dtype, batch=batch)
            tokens: dict[str, list[list[int]]] = {}
            for repeat in range(args.repeat):
                for engine in engines:
                    run, out = engine.run(prompts)
                    row.engines.setdefault(engine.name, EngineResult(engine.name, batch)).runs.append(run)
                    tokens[engine.name] = out
                    extra = "" if run.decode_step_ms is None else f", decode step {run.decode_step_ms:.1f} ms"
                    log(
                        f"[{dtype}] batch {batch:>3} repeat {repeat + 1}/{args.repeat} {engine.name:>8}: "
                        f"{run.seconds:7.2f}s  {run.tok_per_s:8.1f} tok/s{extra}"
                    )
            if "deepflow" in tokens and "hf" in tokens:
                pairs = list(zip(tokens["deepflow"], tokens["hf"], strict=True))
                prefixes = [common_prefix(a, b) / args.output_len for a, b in pairs]
                row.prefix_agreement = statistics.fmean(prefixes)
                row.first_token_agreement = statistics.fmean(float(a[0] == b[0]) for a, b in pairs)
            results.append(row)
    finally:
        for engine in engines:
            engine.close()
    return results


# -- reporting -----------------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_rows(results: list[BatchResult], multi_dtype: bool) -> tuple[list[str], list[list[str]]]:
    header = [
        "batch",
        "deepflow tok/s",
        "HF tok/s",
        "deepflow / HF",
        "deepflow decode step (ms)",
        "deepflow prefill (s)",
    ]
    if multi_dtype:
        header.insert(0, "dtype")
    rows = []
    for r in results:
        ours = r.engines.get("deepflow")
        row = [
            str(r.batch),
            fmt(r.tok_per_s("deepflow"), ".1f"),
            fmt(r.tok_per_s("hf"), ".1f"),
            fmt(r.ratio, ".2f") + ("×" if r.ratio is not None else ""),
            fmt(None if ours is None else ours.best.decode_step_ms, ".1f"),
            fmt(None if ours is None else ours.best.prefill_s, ".2f"),
        ]
        if multi_dtype:
            row.insert(0, r.dtype)
        rows.append(row)
    return header, rows


def render_plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    return "\n".join(lines)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def notes(results: list[BatchResult], args: argparse.Namespace) -> list[str]:
    out = []
    if args.repeat > 1:
        for r in results:
            for e in r.engines.values():
                rates = [run.tok_per_s for run in e.runs]
                spread = (max(rates) - min(rates)) / max(rates) * 100
                out.append(
                    f"{r.dtype} batch {r.batch} {e.engine}: runs "
                    + ", ".join(f"{x:.1f}" for x in rates)
                    + f" tok/s (spread {spread:.0f}%)"
                )
    for r in results:
        if r.prefix_agreement is not None and r.first_token_agreement is not None:
            out.append(
                f"{r.dtype} batch {r.batch}: greedy agreement deepflow vs HF: common prefix "
                f"{r.prefix_agreement * 100:.0f}% of {args.output_len} tokens, first token "
                f"{r.first_token_agreement * 100:.0f}% of sequences"
            )
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(TORCH_DTYPES),
        default=["bfloat16"],
        help="one or more; engines are loaded once per dtype",
    )
    parser.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per engine and batch; best is kept")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="deepflow step token budget (raised to fit max(batch) * input-len)",
    )
    parser.add_argument("--sync", action="store_true", help="deepflow without async scheduling")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="write raw numbers here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.input_len < 1 or args.output_len < 1 or min(args.batch_sizes) < 1:
        parser.error("--repeat, --input-len, --output-len and batch sizes must be positive")
    args.engines = list(dict.fromkeys(args.engines))  # deepflow first when both, whatever the order given
    args.engines.sort(key=ENGINES.index)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = resolve_model_path(args.model)
    env = environment(args.dtype)
    log(environment_line(env))
    log(
        f"model {model_path}, input {args.input_len} tokens, output {args.output_len} tokens, "
        f"engines {' '.join(args.engines)}, repeat {args.repeat}"
    )

    results: list[BatchResult] = []
    for dtype in args.dtype:
        results += benchmark_dtype(args, dtype, model_path)

    header, rows = table_rows(results, multi_dtype=len(args.dtype) > 1)
    print(environment_line(env))
    print(
        f"Model {Path(model_path).name}; {args.input_len} prompt tokens + {args.output_len} generated tokens "
        f"per request, greedy, EOS ignored; tok/s = batch × {args.output_len} / wall time of the whole "
        f"generate call (prefill included); best of {args.repeat}."
    )
    print()
    print(render_markdown(header, rows) if args.markdown else render_plain(header, rows))
    extra = notes(results, args)
    if extra:
        print()
        print("\n".join(("- " if args.markdown else "") + line for line in extra))

    if args.json is not None:
        payload = {
            "environment": env,
            "model": model_path,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "repeat": args.repeat,
            "seed": args.seed,
            "async_scheduling": not args.sync,
            "results": [
                {
                    "dtype": r.dtype,
                    "batch": r.batch,
                    "ratio": r.ratio,
                    "prefix_agreement": r.prefix_agreement,
                    "first_token_agreement": r.first_token_agreement,
                    "engines": {
                        name: {"best": asdict(e.best), "runs": [asdict(run) for run in e.runs]}
                        for name, e in r.engines.items()
                    },
                }
                for r in results
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
