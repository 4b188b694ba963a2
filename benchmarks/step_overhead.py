"""Per-step host overhead of deepflow's decode: how much of a step is ATen kernels, and how much is not.

Reproduce (about a minute on 2 cores):

    .venv/bin/python benchmarks/step_overhead.py [--batch-sizes 1 32] [--input-len 256] [--steps 20]
        [--model PATH] [--sync] [--threads N] [--json OUT]

The engine is built as in benchmarks/offline_throughput.py (`deepflow.LLM`, bf16, greedy, EOS ignored) and
every batch size runs one `generate` of `batch` random prompts of `input-len` tokens. The model runner's
`execute` is wrapped (no engine code changes); among the steps where all `batch` requests decode one token:

1. the first `--warmup` steps are skipped;
2. `--steps` run under `torch.profiler` (CPU activity), each step under a record_function annotation; the
   profiler is started and stopped INSIDE the model-runner thread (it only records the thread that started
   it);
3. `--steps` more are timed with perf_counter only, half just before the profiled ones and half just after
   (so that load from other processes hits both alike): `execute` wall time (model thread) and the step
   period, start to start of consecutive `execute` calls (what the engine takes per token, scheduling and
   output handling included where async scheduling does not hide them).

From each profiled step (the table shows medians over steps; the top-op tables are means):
* ATen time: total CPU time of the top-level ops (sum of the self times of every op under them);
* kernel time: self CPU time of the ops that do the work, the leaves of the dispatch (`is_kernel_op`):
  an op with a CPU kernel registered (plus copy_, whose kernel is backend-generic), not a view or an
  allocation (BOOKKEEPING); a composite's own time (`aten::linear` around its matmul, `aten::to`,
  `aten::rms_norm` decomposed into pow/mean/rsqrt/mul...) and bookkeeping ops count as dispatch;
* dispatch = ATen time - kernel time (ATen's own glue: composite wrappers, views, allocations);
* Python gap = profiled execute - ATen time (Python and the dispatcher entry between ops);
* host overhead = execute - kernel time, for the profiled steps and, against the unprofiled execute time,
  an estimate free of the profiler's own per-op cost (kernel times are measured by the profiler either way);
* ops per step: every op the profiler recorded, and the top-level ones;
* top 10 ops by self CPU time, and top 10 ops called from Python by total time (with the ops under them).
Threads: intra-op work runs on torch's OpenMP team; the calling thread waits for it inside the op, so an
op's self CPU time on the model thread is its wall time.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# Ops that move no data (views, metadata) or only allocate: never kernels, whatever is registered for them.
BOOKKEEPING = frozenset(
    "aten::" + name
    for name in [
        *("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "view"),
        *("reshape", "_reshape_alias", "as_strided", "transpose", "t", "permute", "expand", "expand_as"),
        *("unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "narrow", "detach"),
        *("alias", "_unsafe_view", "unflatten", "flatten", "lift_fresh", "contiguous", "result_type"),
    ]
)
# Work-doing ops whose kernel is registered as CompositeExplicitAutograd rather than per backend.
EXPLICIT_KERNELS = frozenset({"aten::copy_"})
TOP = 10


@dataclass
class OpStat:
    name: str
    calls_per_step: float
    self_ms_per_step: float
    share: float  # of the profiled execute time
    kind: str  # kernel | dispatch


@dataclass
class TopLevelStat:
    """An op called from Python, with everything under it."""

    name: str
    calls_per_step: float
    total_ms_per_step: float
    share: float  # of the profiled execute time
    ops_per_call: float  # itself + the ops under it


@dataclass
class BatchReport:
    batch: int
    context_start: int  # context length at the first profiled step
    steps_timed: int
    steps_profiled: int
    period_ms: float  # unprofiled: start of one decode execute to the next
    execute_ms: float  # unprofiled execute wall time
    execute_profiled_ms: float
    aten_ms: float
    kernel_ms: float
    dispatch_ms: float
    python_gap_ms: float
    host_overhead_profiled_ms: float
    host_overhead_ms: float  # unprofiled execute - kernel
    ops_per_step: float
    top_level_ops_per_step: float
    kernel_ops_per_step: float
    # Every step, for spotting noise: profiled execute, its kernel time, unprofiled execute (ms).
    execute_profiled_steps_ms: list[float] = field(default_factory=list)
    kernel_steps_ms: list[float] = field(default_factory=list)
    execute_steps_ms: list[float] = field(default_factory=list)
    top_ops: list[OpStat] = field(default_factory=list)
    top_level_ops: list[TopLevelStat] = field(default_factory=list)


@functools.cache
def is_kernel_op(name: str) -> bool:
    """Whether an op's own (self) time is kernel work: it has a CPU kernel (or is in EXPLICIT_KERNELS) and
    is no view/allocation. Composites (CompositeImplicitAutograd: linear, matmul, to, softmax, rms_norm, ...;
    or CompositeExplicitAutograd wrappers: _to_copy, clone, embedding) only call other ops, so their own
    time is dispatch. A CPU kernel that itself calls small ops (bmm -> resolve_conj) keeps its self time as
    kernel time: if anything, host overhead is under-counted."""
    if name in BOOKKEEPING:
        return False
    if name in EXPLICIT_KERNELS:
        return True
    namespace, _, op = name.partition("::")
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
        overloads = packet.overloads()
    except (AttributeError, RuntimeError):
        return True  # not an operator we can look up: count it as work
    for overload in overloads:
        full = name if overload == "default" else f"{name}.{overload}"
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(full, "CPU"):
                return True
        except RuntimeError:
            continue
    return False


STEP_LABEL = "step_overhead::decode_step"


class StepProbe:
    """Wraps `runner.execute`: after `warmup` full decode steps of `batch` sequences, times steps // 2 with
    perf_counter, profiles `steps` (each under a STEP_LABEL annotation), then times the rest of `steps`: the
    timed steps bracket the profiled ones, so a burst of load from others hits both alike."""

    def __init__(self, runner: Any, batch: int, warmup: int, steps: int) -> None:
        self.batch, self.warmup, self.steps = batch, warmup, steps
        self.before = steps // 2
        self.seen = 0
        self.starts: list[list[float]] = [[], []]  # timed phases: start of every decode execute
        self.execute: list[float] = []
        self.profiled_execute: list[float] = []
        self.context_start = 0
        self.prof: profile | None = None
        self._runner = runner
        inner: Callable[[Any], Any] = runner.execute
        self._inner = inner

        def timed(scheduled: Any, phase: int) -> Any:
            start = time.perf_counter()
            result = inner(scheduled)
            self.execute.append(time.perf_counter() - start)
            self.starts[phase].append(start)
            return result

        def probed(scheduled: Any) -> Any:
            counts = list(scheduled.num_scheduled_tokens.values())
            if len(counts) != self.batch or any(c != 1 for c in counts):
                return inner(scheduled)
            index = self.seen - warmup
            self.seen += 1
            if index < 0:
                return inner(scheduled)
            if index < self.before:
                return timed(scheduled, 0)
            if index < self.before + steps:
                if self.prof is None:
                    ids = list(scheduled.num_scheduled_tokens)
                    self.context_start = self._runner.requests[ids[0]].num_computed_tokens + 1
                    self.prof = profile(activities=[ProfilerActivity.CPU])
                    self.prof.__enter__()
                start = time.perf_counter()
                with record_function(STEP_LABEL):
                    result = inner(scheduled)
                self.profiled_execute.append(time.perf_counter() - start)
                if index == self.before + steps - 1:
                    self.prof.__exit__(None, None, None)
                return result
            if index < 2 * steps:
                return timed(scheduled, 1)
            return inner(scheduled)

        runner.execute = probed

    def restore(self) -> None:
        self._runner.execute = self._inner

    @property
    def complete(self) -> bool:
        return len(self.profiled_execute) == self.steps and len(self.execute) == self.steps


def _walk(event: Any) -> Iterator[Any]:
    yield event
    for child in event.cpu_children:
        yield from _walk(child)


def analyse(probe: StepProbe) -> BatchReport:
    """Per-step sums from each profiled step's annotation subtree; the step figures are medians over steps
    (robust to a burst of load from other processes), the top-op tables means."""
    assert probe.prof is not None
    us = 1e-3  # profiler times are in microseconds; report milliseconds
    steps = sorted((e for e in probe.prof.events() if e.name == STEP_LABEL), key=lambda e: e.time_range.start)
    n = len(steps)
    if n != probe.steps:
        raise RuntimeError(f"found {n} profiled step annotations, expected {probe.steps}")
    aten_ms, kernel_ms, ops, top_ops, kernel_ops = [], [], [], [], []
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_top: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for step in steps:
        top_level = [e for e in step.cpu_children if not e.is_user_annotation]
        events = [e for t in top_level for e in _walk(t) if not e.is_user_annotation]
        kernels = [e for e in events if is_kernel_op(e.name)]
        aten_ms.append(sum(e.cpu_time_total for e in top_level) * us)
        kernel_ms.append(sum(e.self_cpu_time_total for e in kernels) * us)
        ops.append(len(events))
        top_ops.append(len(top_level))
        kernel_ops.append(len(kernels))
        for e in events:
            by_name[e.name][0] += 1
            by_name[e.name][1] += e.self_cpu_time_total
        for e in top_level:
            row = by_top[e.name]
            row[0] += 1
            row[1] += e.cpu_time_total
            row[2] += sum(1 for _ in _walk(e))
    med = statistics.median
    execute_prof_steps = [t * 1e3 for t in probe.profiled_execute]
    execute_prof = med(execute_prof_steps)
    aten, kernel = med(aten_ms), med(kernel_ms)
    execute = med(probe.execute) * 1e3
    periods = [b - a for starts in probe.starts for a, b in itertools.pairwise(starts)]
    mean_execute_prof = statistics.fmean(execute_prof_steps)
    top = sorted(by_name.items(), key=lambda item: item[1][1], reverse=True)[:TOP]
    top_total = sorted(by_top.items(), key=lambda item: item[1][1], reverse=True)[:TOP]
    return BatchReport(
        batch=probe.batch,
        context_start=probe.context_start,
        steps_timed=len(probe.execute),
        steps_profiled=n,
        period_ms=med(periods) * 1e3 if periods else float("nan"),
        execute_ms=execute,
        execute_profiled_ms=execute_prof,
        aten_ms=aten,
        kernel_ms=kernel,
        dispatch_ms=med(a - k for a, k in zip(aten_ms, kernel_ms, strict=True)),
        python_gap_ms=med(x - a for x, a in zip(execute_prof_steps, aten_ms, strict=True)),
        host_overhead_profiled_ms=med(x - k for x, k in zip(execute_prof_steps, kernel_ms, strict=True)),
        host_overhead_ms=execute - kernel,
        ops_per_step=med(ops),
        top_level_ops_per_step=med(top_ops),
        kernel_ops_per_step=med(kernel_ops),
        execute_profiled_steps_ms=execute_prof_steps,
        kernel_steps_ms=kernel_ms,
        execute_steps_ms=[t * 1e3 for t in probe.execute],
        top_ops=[
            OpStat(
                name=name,
                calls_per_step=calls / n,
                self_ms_per_step=self_us * us / n,
                share=self_us * us / n / mean_execute_prof,
                kind="kernel" if is_kernel_op(name) else "dispatch",
            )
            for name, (calls, self_us) in top
        ],
        top_level_ops=[
            TopLevelStat(
                name=name,
                calls_per_step=calls / n,
                total_ms_per_step=total_us * us / n,
                share=total_us * us / n / mean_execute_prof,
                ops_per_call=ops_ / calls,
            )
            for name, (calls, total_us, ops_) in top_total
        ],
    )


# -- running -------------------------------------------------------------------------------------------------


def make_prompts(batch: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    return torch.randint(100, vocab_size - 100, (batch, input_len), generator=generator).tolist()


def run(args: argparse.Namespace) -> tuple[str, list[BatchReport]]:
    from deepflow import LLM, SamplingParams

    max_batch = max(args.batch_sizes)
    output_len = args.warmup + 2 * args.steps + 3
    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(2048, max_batch * args.input_len),
        max_model_len=args.input_len + output_len + 8,
        async_scheduling=not args.sync,
        num_threads=args.threads,
    )
    model_path = str(llm.core.model_path)
    vocab = llm.core.runner.model.args.vocab_size
    runner = llm.core.runner
    reports: list[BatchReport] = []
    try:
        # Untimed warm-up: every kernel's first call, the gather buffer at its largest, the profiler.
        warm = [
            {"prompt_token_ids": p} for p in make_prompts(max_batch, args.input_len, vocab, args.seed + 1)
        ]
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        with profile(activities=[ProfilerActivity.CPU]):
            torch.ones(8).sum()
        for batch in args.batch_sizes:
            prompts = [{"prompt_token_ids": p} for p in make_prompts(batch, args.input_len, vocab, args.seed)]
            probe = StepProbe(runner, batch, args.warmup, args.steps)
            gc.collect()
            started = time.perf_counter()
            try:
                llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
            finally:
                probe.restore()
            if not probe.complete:
                raise RuntimeError(f"batch {batch}: only {len(probe.profiled_execute)} profiled decode steps")
            report = analyse(probe)
            reports.append(report)
            log(
                f"batch {batch}: generate {time.perf_counter() - started:.1f}s, "
                f"execute {report.execute_ms:.2f} ms, kernels {report.kernel_ms:.2f} ms"
            )
    finally:
        llm.shutdown()
    return model_path, reports


# -- output --------------------------------------------------------------------------------------------------


def render_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, ["-" * w for w in widths], *rows]
    ]


def render(env: dict[str, Any], reports: list[BatchReport]) -> str:
    lines = [
        f"CPU: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']} "
        f"({env['torch_threads']} threads), model {Path(env['model']).name} {env['dtype']}, "
        f"input {env['input_len']} tokens, async scheduling "
        f"{'on' if env['async_scheduling'] else 'off'}, load average at start {env['loadavg_at_start']}",
        "",
    ]
    metrics: list[tuple[str, Callable[[BatchReport], str]]] = [
        ("context at first profiled step", lambda r: str(r.context_start)),
        ("steps timed / profiled", lambda r: f"{r.steps_timed} / {r.steps_profiled}"),
        ("step period (ms, unprofiled)", lambda r: f"{r.period_ms:.2f}"),
        ("execute wall (ms, unprofiled)", lambda r: f"{r.execute_ms:.2f}"),
        ("execute wall (ms, profiled)", lambda r: f"{r.execute_profiled_ms:.2f}"),
        ("time in ATen ops (ms)", lambda r: f"{r.aten_ms:.2f}"),
        ("  kernels: leaf-op self time (ms)", lambda r: f"{r.kernel_ms:.2f}"),
        ("  dispatch inside ATen (ms)", lambda r: f"{r.dispatch_ms:.2f}"),
        ("Python gap between ops (ms)", lambda r: f"{r.python_gap_ms:.2f}"),
        ("host overhead, profiled (ms)", lambda r: f"{r.host_overhead_profiled_ms:.2f}"),
        ("host overhead, unprofiled est. (ms)", lambda r: f"{r.host_overhead_ms:.2f}"),
        ("host overhead share of execute", lambda r: f"{r.host_overhead_ms / r.execute_ms * 100:.0f}%"),
        ("period - execute: model thread idle (ms)", lambda r: f"{r.period_ms - r.execute_ms:.2f}"),
        (
            "ops per step (all / top-level / kernels)",
            lambda r: f"{r.ops_per_step:.0f} / {r.top_level_ops_per_step:.0f} / {r.kernel_ops_per_step:.0f}",
        ),
    ]
    header = ["per decode step", *(f"batch {r.batch}" for r in reports)]
    lines += render_table(header, [[label, *(fn(r) for r in reports)] for label, fn in metrics])
    for r in reports:
        lines += [
            "",
            f"batch {r.batch}: top {TOP} ops by self CPU time (per step; share of profiled execute)",
        ]
        rows = [
            [o.name, f"{o.calls_per_step:.0f}", f"{o.self_ms_per_step:.3f}", f"{o.share * 100:.1f}%", o.kind]
            for o in r.top_ops
        ]
        lines += render_table(["op", "calls", "self ms", "share", "kind"], rows)
        lines += [
            "",
            f"batch {r.batch}: top {TOP} ops called from Python, by total time with the ops under them",
        ]
        rows = [
            [
                o.name,
                f"{o.calls_per_step:.0f}",
                f"{o.total_ms_per_step:.3f}",
                f"{o.share * 100:.1f}%",
                f"{o.ops_per_call:.1f}",
            ]
            for o in r.top_level_ops
        ]
        lines += render_table(["op", "calls", "total ms", "share", "ops per call"], rows)
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed, then as many profiled")
    parser.add_argument("--warmup", type=int, default=5, help="decode steps skipped first")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--sync", action="store_true", help="deepflow without async scheduling")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.steps < 2 or args.warmup < 0 or args.input_len < 1:
        parser.error("batch sizes and --input-len must be positive, --steps >= 2, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    model_path, reports = run(args)
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    env = {
        "cpu": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "model": model_path,
        "dtype": args.dtype,
        "input_len": args.input_len,
        "async_scheduling": not args.sync,
        "loadavg_at_start": load,
    }
    print(render(env, reports))
    if args.json is not None:
        payload = {"environment": env, "results": [asdict(r) for r in reports]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
