"""FlowServe's small-batch bf16 GEMM and fused small ops against the torch paths they replace.

Reproduce:

    .venv/bin/python benchmarks/linear_kernels.py [--rounds 12] [--threads N] [--quick] [--json OUT]

Everything runs on `torch.get_num_threads()` threads at SmolLM2-135M's shapes (hidden 576, intermediate
1536, 9 heads, 3 KV heads, head_dim 64, 30 layers, vocab 49152). The machine is shared, so every comparison
is measured in interleaved rounds (kernel, torch, kernel, torch, ...), the best of each side kept: the
ratios are from the same minutes.

* decode sweep: the 30 layers' projections (qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576,
  each layer its own weight) + the LM head (576->49152), all 121 calls, at M = 1, 2, 4, 8, 16 rows:
  `small_linear` over `pack_linear_weight` vs oneDNN (`mkldnn._linear_pointwise` on
  `mkldnn._reorder_linear_weight(w, 1)`, the model's PackedLinear). GB/s = weight bytes / time (269 MB,
  8x L3: the weights stream from memory as in a real decode step).
* crossover: per shape, M = 1..16, each call over 30 distinct weights (the LM head: 2) so they stream.
* per-call overhead: both on a 16x16 weight at one row.
* rms_norm vs F.rms_norm (what the model runs in bf16), fused_add_rms_norm vs `residual + x` + F.rms_norm,
  silu_and_mul vs `F.silu(gate) * up`, rope_and_cache vs the model's `qk * cos + rotate_half(qk) * sin`
  + two `index_copy_` into the [KVH, NB, BS, hd] caches (cos/sin already gathered, as prepare() does once
  per step; the kernel looks them up itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 576, 1536, 9, 3, 64, 30, 49152
PROJECTIONS = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (VOCAB, HIDDEN)
SWEEP_ROWS = (1, 2, 4, 8, 16)


def best_of(fns: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Seconds per call of each fn: best over `rounds` interleaved rounds of `inner` calls."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return best


def make_weights(shape: tuple[int, int], count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * 0.05).bfloat16() for _ in range(count)]


def onednn(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def dnn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def sweep_small(xs: dict, packed: list, shapes: list, packed_head: torch.Tensor) -> None:
    for layer in packed:
        for p, (n, k) in zip(layer, shapes, strict=True):
            torch.ops.deepflow.small_linear(xs[k], p, None, n)
    torch.ops.deepflow.small_linear(xs[HIDDEN], packed_head, None, VOCAB)


def sweep_onednn(xs: dict, dnn: list, shapes: list, dnn_head: torch.Tensor) -> None:
    for layer in dnn:
        for w, (_, k) in zip(layer, shapes, strict=True):
            dnn_linear(xs[k], w)
    dnn_linear(xs[HIDDEN], dnn_head)


def many_small(x: torch.Tensor, packed: list, n: int) -> None:
    for p in packed:
        torch.ops.deepflow.small_linear(x, p, None, n)


def many_onednn(x: torch.Tensor, dnn: list) -> None:
    for w in dnn:
        dnn_linear(x, w)


def bench_sweep(rounds: int, sweep_rows: tuple[int, ...] = SWEEP_ROWS) -> list[dict]:
    ops = torch.ops.deepflow
    layers = [
        [make_weights(s, 1, 100 * i + j)[0] for j, s in enumerate(PROJECTIONS.values())]
        for i in range(LAYERS)
    ]
    head = make_weights(LM_HEAD, 1, 7)[0]
    shapes = list(PROJECTIONS.values())
    packed = [[ops.pack_linear_weight(w) for w in layer] for layer in layers]
    packed_head = ops.pack_linear_weight(head)
    dnn = [[onednn(w) for w in layer] for layer in layers]
    dnn_head = onednn(head)
    weight_bytes = sum(w.numel() * 2 for layer in layers for w in layer) + head.numel() * 2
    del layers, head
    rows = []
    for m in sweep_rows:
        xs = {k: torch.randn(m, k).bfloat16() for k in (HIDDEN, INTER)}

        kernel = partial(sweep_small, xs, packed, shapes, packed_head)
        torch_path = partial(sweep_onednn, xs, dnn, shapes, dnn_head)
        t = best_of({"kernel": kernel, "onednn": torch_path}, rounds, 1)
        rows.append(
            dict(
                m=m,
                kernel_ms=t["kernel"] * 1e3,
                onednn_ms=t["onednn"] * 1e3,
                speedup=t["onednn"] / t["kernel"],
                kernel_gbs=weight_bytes / t["kernel"] / 1e9,
                onednn_gbs=weight_bytes / t["onednn"] / 1e9,
            )
        )
        r = rows[-1]
        print(
            f"  M={m:2d}  kernel {r['kernel_ms']:6.2f} ms ({r['kernel_gbs']:4.1f} GB/s)  "
            f"oneDNN {r['onednn_ms']:6.2f} ms ({r['onednn_gbs']:4.1f} GB/s)  x{r['speedup']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def bench_crossover(rounds: int, max_rows: int) -> dict[str, list[dict]]:
    ops = torch.ops.deepflow
    out: dict[str, list[dict]] = {}
    for index, (name, shape) in enumerate([*PROJECTIONS.items(), ("lm_head", LM_HEAD)]):
        count = 2 if name == "lm_head" else 30
        weights = make_weights(shape, count, 1000 + index)
        packed = [ops.pack_linear_weight(w) for w in weights]
        dnn = [onednn(w) for w in weights]
        del weights
        n, k = shape
        per_shape = []
        for m in range(1, max_rows + 1):
            x = torch.randn(m, k).bfloat16()

            kernel = partial(many_small, x, packed, n)
            torch_path = partial(many_onednn, x, dnn)
            t = best_of({"kernel": kernel, "onednn": torch_path}, rounds, 1)
            per_shape.append(
                dict(m=m, kernel_us=t["kernel"] / count * 1e6, onednn_us=t["onednn"] / count * 1e6)
            )
        out[name] = per_shape
        faster = [r["m"] for r in per_shape if r["onednn_us"] < r["kernel_us"]]
        summary = (
            f"oneDNN first faster at M={faster[0]}" if faster else f"kernel faster for all M<={max_rows}"
        )
        print(f"  {name:8s} {n}x{k}: {summary}", file=sys.stderr, flush=True)
    return out


def bench_overhead(rounds: int) -> dict[str, float]:
    ops = torch.ops.deepflow
    w = torch.randn(16, 16).bfloat16()
    p, d = ops.pack_linear_weight(w), onednn(w)
    x = torch.randn(1, 16).bfloat16()
    t = best_of(
        {"kernel": lambda: ops.small_linear(x, p, None, 16), "onednn": lambda: dnn_linear(x, d)}, rounds, 2000
    )
    return {"small_linear_us": t["kernel"] * 1e6, "onednn_us": t["onednn"] * 1e6}


def bench_small_ops(rounds: int) -> list[dict]:
    from deepflow.engine.attention.torch_backend import _rotate_half

    ops = torch.ops.deepflow
    bf = torch.bfloat16
    rows: list[dict] = []

    def record(op: str, shape: str, kernel: Callable[[], object], torch_fn: Callable[[], object]) -> None:
        t = best_of({"kernel": kernel, "torch": torch_fn}, rounds, 200)
        rows.append(
            dict(op=op, shape=shape, kernel_us=t["kernel"] * 1e6, torch_us=t["torch"] * 1e6,
                 speedup=t["torch"] / t["kernel"])
        )  # fmt: skip
        r = rows[-1]
        print(
            f"  {op:20s} {shape:14s} kernel {r['kernel_us']:7.2f} us  torch {r['torch_us']:7.2f} us  "
            f"x{r['speedup']:.1f}",
            file=sys.stderr,
            flush=True,
        )

    weight = torch.randn(HIDDEN).to(bf)
    for t_rows in (1, 8, 16):
        x = torch.randn(t_rows, HIDDEN).to(bf)
        out = torch.empty_like(x)
        record(
            "rms_norm", f"[{t_rows},{HIDDEN}]",
            lambda x=x, out=out: ops.rms_norm(out, x, weight, 1e-5),
            lambda x=x: F.rms_norm(x, (HIDDEN,), weight, 1e-5),
        )  # fmt: skip
        res = torch.randn(t_rows, HIDDEN).to(bf)
        xx = x.clone()
        record(
            "fused_add_rms_norm", f"[{t_rows},{HIDDEN}]",
            lambda xx=xx, res=res: ops.fused_add_rms_norm(xx, res, weight, 1e-5),
            lambda x=x, res=res: F.rms_norm(res + x, (HIDDEN,), weight, 1e-5),
        )  # fmt: skip
    for t_rows in (1, 8, 16):
        gu = torch.randn(t_rows, 2 * INTER).to(bf)
        out = torch.empty(t_rows, INTER, dtype=bf)
        record(
            "silu_and_mul", f"[{t_rows},{2 * INTER}]",
            lambda gu=gu, out=out: ops.silu_and_mul(out, gu),
            lambda gu=gu: F.silu(gu[:, :INTER]) * gu[:, INTER:],
        )  # fmt: skip
    max_pos, block_size, num_blocks = 2048, 16, 256
    emb = torch.randn(max_pos, HEAD_DIM // 2)
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)
    k_cache = torch.zeros(KV_HEADS, num_blocks, block_size, HEAD_DIM, dtype=bf)
    v_cache = torch.zeros_like(k_cache)
    for t_rows in (1, 8, 16):
        qkv = torch.randn(t_rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM).to(bf)
        qk, v = qkv.split([(HEADS + KV_HEADS) * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        qk, v = qk.view(t_rows, HEADS + KV_HEADS, HEAD_DIM), v.view(t_rows, KV_HEADS, HEAD_DIM)
        positions = torch.randint(0, max_pos, (t_rows,))
        slots = torch.randperm(num_blocks * block_size)[:t_rows]
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

        def model_path(qk: torch.Tensor = qk, v: torch.Tensor = v, c=c, s=s, slots=slots) -> None:
            r = qk * c + _rotate_half(qk) * s
            _, k = r.split([HEADS, KV_HEADS], dim=1)
            k_cache.view(KV_HEADS, -1, HEAD_DIM).index_copy_(1, slots, k.transpose(0, 1))
            v_cache.view(KV_HEADS, -1, HEAD_DIM).index_copy_(1, slots, v.transpose(0, 1))

        record(
            "rope_and_cache", f"T={t_rows}",
            lambda qk=qk, v=v, positions=positions, slots=slots: ops.rope_and_cache(
                qk, v, cos, sin, positions, k_cache, v_cache, slots, HEADS, KV_HEADS),
            model_path,
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=12, help="interleaved rounds per comparison (best kept)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads first (default: torch's count)")
    parser.add_argument("--quick", action="store_true", help="crossover up to M=8 only, fewer rounds")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=list(SWEEP_ROWS), help="row counts of the decode sweep"
    )
    parser.add_argument("--sweep-only", action="store_true", help="only the decode sweep")
    args = parser.parse_args()
    from deepflow.engine import kernels

    if not kernels.load():
        raise SystemExit(f"deepflow kernels unavailable: {kernels.unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    torch.manual_seed(0)
    results: dict = {"threads": torch.get_num_threads(), "loadavg_before": os.getloadavg()}
    with torch.inference_mode():
        print("per-call overhead", file=sys.stderr)
        results["overhead"] = bench_overhead(rounds)
        print(f"  {results['overhead']}", file=sys.stderr)
        print("decode sweep: 30 layers' projections + LM head", file=sys.stderr)
        results["sweep"] = bench_sweep(rounds, tuple(args.rows))
        if args.sweep_only:
            return
        print("crossover per shape", file=sys.stderr)
        results["crossover"] = bench_crossover(rounds, 8 if args.quick else 16)
        print("fused small ops (bf16)", file=sys.stderr)
        results["small_ops"] = bench_small_ops(rounds)
    results["loadavg_after"] = os.getloadavg()
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_tables(results: dict) -> None:
    o = results["overhead"]
    print(
        f"\nthreads: {results['threads']}; load average before {results['loadavg_before'][0]:.2f}, "
        f"after {results['loadavg_after'][0]:.2f} (1 min; the machine is shared)"
    )
    print(
        f"per-call overhead (16x16 weight, 1 row): small_linear {o['small_linear_us']:.1f} us, "
        f"oneDNN {o['onednn_us']:.1f} us\n"
    )
    print("| M | kernel ms | kernel GB/s | oneDNN ms | oneDNN GB/s | speedup |")
    print("|---|---|---|---|---|---|")
    for r in results["sweep"]:
        print(
            f"| {r['m']} | {r['kernel_ms']:.2f} | {r['kernel_gbs']:.1f} | {r['onednn_ms']:.2f} | "
            f"{r['onednn_gbs']:.1f} | {r['speedup']:.2f}x |"
        )
    names = list(results["crossover"])
    print("\nper call, us (kernel / oneDNN):\n")
    print("| M | " + " | ".join(f"{n} {PROJECTIONS.get(n, LM_HEAD)[1]}->{PROJECTIONS.get(n, LM_HEAD)[0]}"
                              for n in names) + " |")  # fmt: skip
    print("|---|" + "---|" * len(names))
    for i, r0 in enumerate(results["crossover"][names[0]]):
        cells = []
        for n in names:
            r = results["crossover"][n][i]
            mark = " *" if r["onednn_us"] < r["kernel_us"] else ""
            cells.append(f"{r['kernel_us']:.0f} / {r['onednn_us']:.0f}{mark}")
        print(f"| {r0['m']} | " + " | ".join(cells) + " |")
    print("(* oneDNN faster)\n")
    print("| op | shape | kernel us | torch us | speedup |")
    print("|---|---|---|---|---|")
    for r in results["small_ops"]:
        print(
            f"| {r['op']} | {r['shape']} | {r['kernel_us']:.2f} | {r['torch_us']:.2f} | {r['speedup']:.1f}x |"
        )


if __name__ == "__main__":
    main()
