"""An honest roofline for this machine: measured memory bandwidth and bf16 GEMM rate, and the decode floor.

Reproduce:

    .venv/bin/python benchmarks/roofline.py [--model PATH] [--threads N] [--json OUT]

What is measured (on `torch.get_num_threads()` threads, the count the engine uses by default; `--threads`
changes it for everything), each the best of `--repeats` timed calls after one untimed warm-up, and the
whole set measured `--rounds` times in turn (fresh buffers; best kept, every round listed: the machine is
shared, and its neighbours move the bandwidth by up to 2x from one minute to the next):

* read bandwidth: `x.sum()` over a buffer much larger than L3 (max(16 x L3, 512 MiB)), fp32 and bf16; the
  faster of the two is the read bandwidth (bytes of the buffer / time).
* copy bandwidth: `y.copy_(x)` on two such buffers, counted as read + write = 2 x the buffer per call (the
  write-allocate read a cache may add is not counted, as is usual for STREAM-style "copy").
* bf16 GEMM: `torch.matmul` at a prefill-like shape, 256x576 @ 576x1536 (2*M*K*N flops per call).
* bf16 GEMV streaming: one row through `F.linear` over distinct 1536x576 weights that together exceed L3
  several times (as decoding walks 30 layers' weights), so it reads DRAM like a real decode step; bytes of
  the weights / time. Also through oneDNN's packed weights (`PackedLinear`, what the engine uses in bf16).

The decode floor of one step is the time to stream, once, every weight a decode step multiplies with plus
every KV entry its attention reads, at the measured read bandwidth:

    floor = (weight_bytes + kv_bytes) / read_bandwidth

`model_decode_bytes` counts, for a Llama-family model (deepflow/engine/models/llama.py):
    weight_bytes = every projection of every layer (q/k/v, o, gate/up, down; q/k/v biases where the model
                   has them) + the LM head, counted once even when tied to the embeddings. The embedding
                   table is not counted (a step reads one row per token), nor are the RMSNorm weights
                   ((2 * layers + 1) * hidden elements: 0.03% of SmolLM2-135M's weights).
    kv_bytes     = 2 (K and V) * layers * kv_heads * head_dim * sum(context lens) * element size
                   (with `round_to_blocks=True`, every context rounded up to whole blocks of block_size,
                   what a paged cache holds; the floor itself does not read the unused slots).
At batch 32 the step is close to compute-bound as well, so the CLI also prints the compute floor
(`model_decode_flops` / the measured GEMM rate) and the roofline = max(memory floor, compute floor).

Without `--model` the embedded SmolLM2-135M-Instruct is used, the folder `deepflow model prepare` writes
($DEEPFLOW_HOME/models/SmolLM2-135M-Instruct, default ~/.cache/deepflow; prepared here if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# The decode floors the CLI prints: (label, per-sequence context length, batch).
FLOOR_POINTS: tuple[tuple[int, int], ...] = ((1, 256), (1, 1024), (32, 320))
GEMM_SHAPE = (256, 576, 1536)  # M, K, N: a 256-token prefill chunk through a 576 -> 1536 projection
GEMV_SHAPE = (1536, 576)  # out, in features of each streamed weight
DEFAULT_BLOCK_SIZE = 16  # EngineConfig.block_size


# -- measurement ---------------------------------------------------------------------------------------------


def l3_bytes() -> int:
    """The last-level cache size from sysfs (32 MiB when it cannot be read)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    size = 0
    for index in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        size = max(size, value)
    return size or 32 << 20


def default_buffer_bytes() -> int:
    return max(16 * l3_bytes(), 512 << 20)


def best_seconds(fn: Callable[[], Any], repeats: int, inner: int = 1) -> float:
    """The fastest of `repeats` timings of `inner` back-to-back calls (per call), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def _buffer(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    # torch.ones touches every page now, so no timed call pays first-touch page faults.
    return torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)


def measure_read_bandwidths(nbytes: int | None = None, repeats: int = 10) -> dict[str, float]:
    """Read-only bytes/s of `x.sum()` per dtype ("float32", "bfloat16") over a buffer of `nbytes`."""
    nbytes = nbytes or default_buffer_bytes()
    out: dict[str, float] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        x = _buffer(nbytes, dtype)
        out[name] = x.numel() * x.element_size() / best_seconds(x.sum, repeats)
        del x
    return out


def measure_bandwidth(nbytes: int | None = None, repeats: int = 10) -> float:
    """Memory read bandwidth in bytes/s: the faster of an fp32 and a bf16 `sum` over a buffer >> L3."""
    return max(measure_read_bandwidths(nbytes, repeats).values())


def measure_copy_bandwidth(nbytes: int | None = None, repeats: int = 10) -> float:
    """`y.copy_(x)` in bytes/s, counting read + write (2 x the buffer) per call."""
    nbytes = nbytes or default_buffer_bytes()
    x = _buffer(nbytes, torch.float32)
    y = torch.zeros_like(x)
    seconds = best_seconds(lambda: y.copy_(x), repeats)
    return 2 * x.numel() * x.element_size() / seconds


def measure_gemm_flops(
    m: int = GEMM_SHAPE[0], k: int = GEMM_SHAPE[1], n: int = GEMM_SHAPE[2], repeats: int = 5, inner: int = 20
) -> float:
    """bf16 `torch.matmul` [m, k] @ [k, n] in FLOP/s (2*m*k*n per call)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(torch.bfloat16)
    b = torch.randn(k, n, generator=generator).to(torch.bfloat16)
    return 2 * m * k * n / best_seconds(lambda: torch.matmul(a, b), repeats, inner)


def measure_gemv_bandwidth(
    packed: bool = False,
    total_bytes: int | None = None,
    repeats: int = 5,
    shape: tuple[int, int] = GEMV_SHAPE,
) -> float:
    """Weight bytes/s of one bf16 row through `F.linear` (or oneDNN-packed weights when `packed`), cycling
    over distinct weights of `shape` that together take `total_bytes` (default: as the bandwidth buffer)."""
    out_features, in_features = shape
    per_weight = out_features * in_features * 2
    count = max((total_bytes or default_buffer_bytes()) // per_weight, 1)
    generator = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16) for _ in range(count)
    ]
    x = torch.randn(1, in_features, generator=generator).to(torch.bfloat16)
    if packed:
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("oneDNN (mkldnn) is not available in this torch build")
        weights = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]

        def run() -> None:
            for w in weights:
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    else:

        def run() -> None:
            for w in weights:
                F.linear(x, w)

    return count * per_weight / best_seconds(run, repeats)


# -- the model's bytes and floors ----------------------------------------------------------------------------


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_weight_elements(model_args: Any, *, biases: bool = True) -> int:
    """Elements of every projection (+ q/k/v biases unless `biases=False`) and the LM head, counted once
    even when tied; no embedding table, no norms."""
    a = model_args
    q_size = a.num_heads * a.head_dim
    kv_size = a.num_kv_heads * a.head_dim
    qkv = a.hidden_size * (q_size + 2 * kv_size) + (q_size + 2 * kv_size if a.qkv_bias and biases else 0)
    o = q_size * a.hidden_size
    gate_up = a.hidden_size * 2 * a.intermediate_size
    down = a.intermediate_size * a.hidden_size
    lm_head = a.vocab_size * a.hidden_size
    return a.num_layers * (qkv + o + gate_up + down) + lm_head


def model_decode_bytes(
    model_args: Any,
    dtype: torch.dtype,
    batch_context_lens: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    round_to_blocks: bool = False,
) -> tuple[int, int]:
    """(weight_bytes, kv_bytes) one decode step must read for sequences at `batch_context_lens` tokens.

    The weights are read once for the whole batch; KV is 2 * layers * kv_heads * head_dim * element size
    per context token (each length rounded up to a multiple of `block_size` when `round_to_blocks`).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if any(n < 0 for n in batch_context_lens):
        raise ValueError(f"context lengths must be >= 0, got {list(batch_context_lens)}")
    element = _element_size(dtype)
    lens = (
        [-(-n // block_size) * block_size for n in batch_context_lens]
        if round_to_blocks
        else batch_context_lens
    )
    a = model_args
    weight_bytes = model_weight_elements(a) * element
    kv_bytes = 2 * a.num_layers * a.num_kv_heads * a.head_dim * sum(lens) * element
    return weight_bytes, kv_bytes


def model_decode_flops(model_args: Any, batch_context_lens: Sequence[int]) -> int:
    """FLOPs of one decode step: 2 per weight element per sequence (projections + LM head), plus attention's
    two matmuls, 2 * 2 * heads * head_dim per context token per layer."""
    a = model_args
    attention = 4 * a.num_layers * a.num_heads * a.head_dim * sum(batch_context_lens)
    return 2 * model_weight_elements(a, biases=False) * len(batch_context_lens) + attention


def decode_floor_seconds(
    weight_bytes: int, kv_bytes: int, bandwidth: float, flops: float = 0.0, flop_rate: float | None = None
) -> float:
    """The memory floor (weight_bytes + kv_bytes) / bandwidth; with `flops` and `flop_rate` the roofline
    max(memory floor, flops / flop_rate)."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    memory = (weight_bytes + kv_bytes) / bandwidth
    if flop_rate is None or flops <= 0:
        return memory
    if flop_rate <= 0:
        raise ValueError(f"flop_rate must be positive, got {flop_rate}")
    return max(memory, flops / flop_rate)


# -- CLI -----------------------------------------------------------------------------------------------------


def resolve_model_path(model: str | None) -> Path:
    if model is not None:
        return Path(model).expanduser()
    from deepflow.weights.embedded import prepare_embedded_model

    return prepare_embedded_model(progress=False)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure_all(repeats: int, rounds: int) -> dict[str, Any]:
    """Every measurement, `rounds` times in turn (fresh buffers each round); the best of each is kept and
    every round's result is listed under "rounds": this machine's neighbours move the numbers."""
    per_round: list[dict[str, Any]] = []
    for _ in range(rounds):
        reads = measure_read_bandwidths(repeats=repeats)
        per_round.append(
            {
                "read_bandwidth_by_dtype": reads,
                "read_bandwidth": max(reads.values()),
                "copy_bandwidth": measure_copy_bandwidth(repeats=repeats),
                "gemm_flops": measure_gemm_flops(),
                "gemv_bandwidth_f_linear": measure_gemv_bandwidth(packed=False),
                "gemv_bandwidth_packed": (
                    measure_gemv_bandwidth(packed=True) if torch.backends.mkldnn.is_available() else None
                ),
            }
        )
    best: dict[str, Any] = {"rounds": per_round}
    for key in ("read_bandwidth", "copy_bandwidth", "gemm_flops", "gemv_bandwidth_f_linear"):
        best[key] = max(r[key] for r in per_round)
    packed = [r["gemv_bandwidth_packed"] for r in per_round if r["gemv_bandwidth_packed"] is not None]
    best["gemv_bandwidth_packed"] = max(packed) if packed else None
    best["read_bandwidth_by_dtype"] = {
        name: max(r["read_bandwidth_by_dtype"][name] for r in per_round) for name in ("float32", "bfloat16")
    }
    return best


def floors(
    model_args: Any, dtype: torch.dtype, measured: dict[str, Any], block_size: int
) -> list[dict[str, Any]]:
    rows = []
    for batch, context in FLOOR_POINTS:
        lens = [context] * batch
        weight_bytes, kv_bytes = model_decode_bytes(model_args, dtype, lens, block_size)
        flops = model_decode_flops(model_args, lens)
        memory_s = decode_floor_seconds(weight_bytes, kv_bytes, measured["read_bandwidth"])
        compute_s = flops / measured["gemm_flops"]
        rows.append(
            {
                "batch": batch,
                "context": context,
                "weight_bytes": weight_bytes,
                "kv_bytes": kv_bytes,
                "flops": flops,
                "memory_floor_ms": memory_s * 1e3,
                "compute_floor_ms": compute_s * 1e3,
                "roofline_ms": max(memory_s, compute_s) * 1e3,
                # The floor if weights only stream as fast as a 1-row F.linear / packed GEMV does here.
                "gemv_floor_ms_f_linear": (weight_bytes + kv_bytes)
                / measured["gemv_bandwidth_f_linear"]
                * 1e3,
                "gemv_floor_ms_packed": (
                    None
                    if measured["gemv_bandwidth_packed"] is None
                    else (weight_bytes + kv_bytes) / measured["gemv_bandwidth_packed"] * 1e3
                ),
                "roofline_tok_per_s": batch / max(memory_s, compute_s),
            }
        )
    return rows


def render(env: dict[str, Any], measured: dict[str, Any], model: dict[str, Any] | None) -> str:
    gb = 1e9
    reads = measured["read_bandwidth_by_dtype"]

    def spread(key: str, unit: float) -> str:
        return ", ".join("–" if r[key] is None else f"{r[key] / unit:.1f}" for r in measured["rounds"])

    def share(key: str) -> str:
        return f"{measured[key] / measured['read_bandwidth'] * 100:.0f}% of read bandwidth"

    lines = [
        f"CPU: {env['cpu']} ({env['cpu_count']} logical cores, L3 {env['l3_bytes'] >> 20} MiB), torch "
        f"{env['torch']}, {env['torch_threads']} threads, buffer {env['buffer_bytes'] >> 20} MiB, "
        f"load average at start {env['loadavg_at_start']}",
        "",
        f"best of {len(measured['rounds'])} rounds [each round's best in brackets]",
        f"read bandwidth (sum):           {measured['read_bandwidth'] / gb:7.1f} GB/s   "
        f"(fp32 {reads['float32'] / gb:.1f}, bf16 {reads['bfloat16'] / gb:.1f})   "
        f"[{spread('read_bandwidth', gb)}]",
        f"copy bandwidth (read+write):    {measured['copy_bandwidth'] / gb:7.1f} GB/s   "
        f"[{spread('copy_bandwidth', gb)}]",
        f"bf16 GEMM {GEMM_SHAPE[0]}x{GEMM_SHAPE[1]} @ {GEMM_SHAPE[1]}x{GEMM_SHAPE[2]}: "
        f"{measured['gemm_flops'] / 1e9:7.1f} GFLOP/s   [{spread('gemm_flops', 1e9)}]",
        f"bf16 GEMV 1 row, F.linear:      {measured['gemv_bandwidth_f_linear'] / gb:7.1f} GB/s of weights, "
        f"{share('gemv_bandwidth_f_linear')}   [{spread('gemv_bandwidth_f_linear', gb)}]",
    ]
    if measured["gemv_bandwidth_packed"] is not None:
        lines.append(
            f"bf16 GEMV 1 row, oneDNN packed: {measured['gemv_bandwidth_packed'] / gb:7.1f} GB/s of weights, "
            f"{share('gemv_bandwidth_packed')}   [{spread('gemv_bandwidth_packed', gb)}]"
        )
    if model is not None:
        tied = ", tied" if model["tied"] else ""
        lines += [
            "",
            f"model {model['name']} ({model['dtype']}): {model['weight_bytes'] / 1e6:.1f} MB of weights "
            f"per step (projections + LM head{tied}), {model['kv_bytes_per_token']} B of KV "
            "per context token",
            "",
        ]
        header = ["batch", "context", "weights MB", "KV MB", "memory floor ms", "compute floor ms"]
        header += ["roofline ms", "roofline tok/s", "at F.linear GEMV ms", "at packed GEMV ms"]
        rows = []
        for r in model["floors"]:
            packed = r["gemv_floor_ms_packed"]
            rows.append(
                [
                    str(r["batch"]),
                    str(r["context"]),
                    f"{r['weight_bytes'] / 1e6:.1f}",
                    f"{r['kv_bytes'] / 1e6:.1f}",
                    f"{r['memory_floor_ms']:.2f}",
                    f"{r['compute_floor_ms']:.2f}",
                    f"{r['roofline_ms']:.2f}",
                    f"{r['roofline_tok_per_s']:.0f}",
                    f"{r['gemv_floor_ms_f_linear']:.2f}",
                    "–" if packed is None else f"{packed:.2f}",
                ]
            )
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
        lines += [
            "",
            "memory floor = (weights + KV) / read bandwidth; compute floor = step FLOPs / GEMM rate; "
            "roofline = the larger.",
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="for model bytes"
    )
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per bandwidth measurement")
    parser.add_argument("--rounds", type=int, default=3, help="all measurements this many times; best kept")
    parser.add_argument("--no-model", action="store_true", help="measure the machine only")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    env = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "l3_bytes": l3_bytes(),
        "buffer_bytes": default_buffer_bytes(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_at_start": load,
    }
    model: dict[str, Any] | None = None
    model_args = None
    if not args.no_model:
        from deepflow.engine.models.llama import ModelArgs

        path = resolve_model_path(args.model)
        model_args = ModelArgs.from_folder(path)
    measured = measure_all(args.repeats, args.rounds)
    if model_args is not None:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        weight_bytes, kv_one = model_decode_bytes(model_args, dtype, [1], args.block_size)
        model = {
            "path": str(path),
            "name": path.name,
            "dtype": args.dtype,
            "tied": model_args.tie_word_embeddings,
            "weight_bytes": weight_bytes,
            "kv_bytes_per_token": kv_one,
            "floors": floors(model_args, dtype, measured, args.block_size),
        }
    print(render(env, measured, model))
    if args.json is not None:
        payload = {"environment": env, "measured": measured, "model": model}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
