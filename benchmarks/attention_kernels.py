"""Paged attention: the C++ kernels (deepflow.engine.kernels.attention) vs today's torch path, one run.

    .venv/bin/python benchmarks/attention_kernels.py [--layers 30] [--rounds 9] [--only decode-b32-ctx320]

SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64), bf16, block size 16, every layer with its own
K/V cache (so 30 layers stream 30 caches, as the engine does) and a shuffled block table. One "step" is
`--layers` attention calls; the table gives the median step time of each path over `--rounds` rounds (the
two paths alternate inside every round, so other load on the machine hits both alike), their ratio, the
best round of each and its ratio (what a quiet machine gives: on a shared 2-core box a burst of other
work stalls every 2-thread fork/join for a scheduler slice), and the achieved bandwidth = bytes of K/V the
step has to read / the best step time.

The torch path is the code of TorchAttention (engine/attention/torch_backend.py) copied here: decodes gather
their blocks with index_select into a persistent dense buffer, then two bmm with an additive length mask;
a fresh prefill runs SDPA (is_causal) on its own K/V, a prefill chunk over a cached context gathers the
context and runs SDPA with a boolean mask. Its per-step preparation (padded tables, masks) is done once,
outside the timing, for both paths.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepflow.engine import kernels
from deepflow.engine.kernels.attention import paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
GROUP = HEADS // KV_HEADS
SCALE = HEAD_DIM**-0.5
DTYPE = torch.bfloat16


@dataclass
class Scenario:
    name: str
    seq_lens: list[int]  # keys per sequence after this step
    query_lens: list[int]  # queries per sequence in this step


SCENARIOS = [
    Scenario("decode b1 ctx1100", [1100], [1]),
    Scenario("decode b32 ctx~320", [304 + (i * 7) % 33 for i in range(32)], [1] * 32),
    Scenario("decode b32 ctx1024", [1024] * 32, [1] * 32),
    Scenario("prefill 256 fresh", [256], [256]),
    Scenario("prefill 256 on 768 cached", [1024], [256]),
    Scenario(
        "mixed 31 dec ctx~320 + 256/768", [304 + (i * 7) % 33 for i in range(31)] + [1024], [1] * 31 + [256]
    ),
]


class Layer:
    """One layer's caches, written with the step's K/V (both paths read the same cache)."""

    def __init__(self, sc: Scenario, tables: list[list[int]], num_blocks: int, gen: torch.Generator) -> None:
        shape = (KV_HEADS, num_blocks, BLOCK, HEAD_DIM)
        self.k_cache = torch.randn(shape, generator=gen).to(DTYPE)
        self.v_cache = torch.randn(shape, generator=gen).to(DTYPE)
        total = sum(sc.query_lens)
        self.q = torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(DTYPE)
        # The step's own K/V (dense, as the projection makes them), also stored in the cache.
        self.k = torch.empty(total, KV_HEADS, HEAD_DIM, dtype=DTYPE)
        self.v = torch.empty(total, KV_HEADS, HEAD_DIM, dtype=DTYPE)
        t = 0
        for table, end, qlen in zip(tables, sc.seq_lens, sc.query_lens, strict=True):
            for p in range(end - qlen, end):
                b, s = table[p // BLOCK], p % BLOCK
                self.k[t] = self.k_cache[:, b, s]
                self.v[t] = self.v_cache[:, b, s]
                t += 1


class TorchPath:
    """TorchAttention's decode (gather + bmm) and prefill (SDPA) code, non-cascade."""

    def __init__(self, sc: Scenario, tables: list[list[int]]) -> None:
        self.sc = sc
        self.d = sum(1 for q in sc.query_lens if q == 1)
        d, bs = self.d, BLOCK
        self.decode_block_table = self.decode_mask = None
        if d:
            lens = sc.seq_lens[:d]
            width = -(-max(lens) // bs)
            padded = [t[:width] + [0] * (width - len(t[:width])) for t in tables[:d]]
            self.decode_block_table = torch.tensor(padded, dtype=torch.long)
            span = width * bs
            lengths = torch.tensor(lens, dtype=torch.long).unsqueeze(1)
            mask = torch.zeros(d, span, dtype=torch.float32)
            mask.masked_fill_(torch.arange(span).unsqueeze(0) >= lengths, float("-inf"))
            self.decode_mask = mask.view(1, d, 1, span)
            buf = torch.empty(2 * KV_HEADS * d * width * bs * HEAD_DIM, dtype=DTYPE)
            size = buf.numel() // 2
            shape = (KV_HEADS, d * width, bs, HEAD_DIM)
            self.decode_gather = (buf[:size].view(shape), buf[size:].view(shape))
        self.prefill = []  # (start, end, blocks or None, kv_len, mask or None)
        first = d
        for i in range(d, len(sc.query_lens)):
            qlen, end = sc.query_lens[i], sc.seq_lens[i]
            start = end - qlen
            if start == 0:
                self.prefill.append((first, first + qlen, None, end, None))
            else:
                blocks = torch.tensor(tables[i][: -(-end // bs)], dtype=torch.long)
                query_pos = torch.arange(start, end).unsqueeze(1)
                self.prefill.append(
                    (first, first + qlen, blocks, end, torch.arange(end).unsqueeze(0) <= query_pos)
                )
            first += qlen

    def __call__(self, layer: Layer) -> torch.Tensor:
        kvh, hd = KV_HEADS, HEAD_DIM
        q, k_cache, v_cache = layer.q, layer.k_cache, layer.v_cache
        out = torch.empty_like(q)
        d = self.d
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache)
        for start, end, blocks, kv_len, mask in self.prefill:
            if blocks is None:
                keys, values = layer.k[start:end].transpose(0, 1), layer.v[start:end].transpose(0, 1)
            else:
                keys = k_cache.index_select(1, blocks).view(kvh, -1, hd)[:, :kv_len]
                values = v_cache.index_select(1, blocks).view(kvh, -1, hd)[:, :kv_len]
            out[start:end] = self._prefill(q[start:end], keys, values, mask)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        assert self.decode_block_table is not None and self.decode_mask is not None
        d = self.decode_block_table.shape[0]
        lmax = self.decode_mask.shape[-1]
        kvh, group, hd = KV_HEADS, GROUP, HEAD_DIM
        flat = self.decode_block_table.view(-1)
        k_buf, v_buf = self.decode_gather
        keys = torch.index_select(k_cache, 1, flat, out=k_buf).view(kvh * d, lmax, hd)
        values = torch.index_select(v_cache, 1, flat, out=v_buf).view(kvh * d, lmax, hd)
        qg = q.view(d, kvh, group, hd).transpose(0, 1).reshape(kvh * d, group, hd)
        scores = torch.bmm(qg, keys.transpose(1, 2)).float().view(kvh, d, group, lmax)
        scores = scores * SCALE + self.decode_mask
        probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kvh * d, group, lmax)
        out = torch.bmm(probs, values).view(kvh, d, group, hd)
        return out.transpose(0, 1).reshape(d, HEADS, hd)

    @staticmethod
    def _prefill(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        qh = q.transpose(0, 1).unsqueeze(0)
        kh = keys.unsqueeze(0)
        vh = values.unsqueeze(0)
        if mask is None:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=SCALE, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=SCALE, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)


class KernelPath:
    direct = False  # --library: call the op of that build directly

    def __init__(self, sc: Scenario, tables: list[list[int]]) -> None:
        width = max(len(t) for t in tables)
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        self.seq_lens = torch.tensor(sc.seq_lens, dtype=torch.int32)
        self.qsl = torch.tensor([0, *torch.tensor(sc.query_lens).cumsum(0).tolist()], dtype=torch.int32)

    def __call__(self, layer: Layer) -> torch.Tensor:
        if self.direct:
            out = torch.empty_like(layer.q)
            torch.ops.deepflow.paged_attention(
                out,
                None,
                layer.q,
                layer.k_cache,
                layer.v_cache,
                self.block_tables,
                self.seq_lens,
                self.qsl,
                SCALE,
                True,
            )
            return out
        return paged_attention(
            layer.q,
            layer.k_cache,
            layer.v_cache,
            self.block_tables,
            self.seq_lens,
            self.qsl,
            SCALE,
            causal=True,
        )


def step_ms(fn, layers: list[Layer]) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    for layer in layers:
        fn(layer)
    return 1000 * (time.perf_counter() - started)


def read_bandwidth_gbs() -> float:
    """What one pass over 512 MiB of bf16 (x.sum) reaches here: the memory roof for the decodes."""
    x = torch.ones(256 << 20, dtype=torch.bfloat16)
    x.sum()
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 2 / best / 1e9


def run(sc: Scenario, num_layers: int, rounds: int, gen: torch.Generator) -> dict[str, float]:
    blocks_per_seq = [-(-n // BLOCK) for n in sc.seq_lens]
    num_blocks = sum(blocks_per_seq) + 8
    ids = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled: blocks of a sequence are scattered
    tables, at = [], 0
    for n in blocks_per_seq:
        tables.append(ids[at : at + n])
        at += n
    layers = [Layer(sc, tables, num_blocks, gen) for _ in range(num_layers)]
    torch_path, kernel_path = TorchPath(sc, tables), KernelPath(sc, tables)
    # Same answer first (bf16 rounding apart).
    diff = (torch_path(layers[0]).float() - kernel_path(layers[0]).float()).abs().max().item()
    for _ in range(2):
        step_ms(torch_path, layers)
        step_ms(kernel_path, layers)
    torch_times, kernel_times = [], []
    for _ in range(rounds):
        torch_times.append(step_ms(torch_path, layers))
        kernel_times.append(step_ms(kernel_path, layers))
    kv_bytes = num_layers * sum(sc.seq_lens) * KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
    torch_ms, kernel_ms = statistics.median(torch_times), statistics.median(kernel_times)
    torch_best, kernel_best = min(torch_times), min(kernel_times)
    return {
        "torch_ms": torch_ms,
        "kernel_ms": kernel_ms,
        "torch_best": torch_best,
        "kernel_best": kernel_best,
        "torch_gbs": kv_bytes / torch_best / 1e6,
        "kernel_gbs": kv_bytes / kernel_best / 1e6,
        "kv_mb": kv_bytes / 1e6,
        "diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", nargs="*", default=None, help="scenario names (substrings)")
    parser.add_argument("--library", help="load this kernel build instead of the installed one (A/B runs)")
    args = parser.parse_args()
    if args.library:
        torch.ops.load_library(args.library)
        KernelPath.direct = True
    elif not kernels.load():
        sys.exit(f"kernels unavailable: {kernels.unavailable_reason()}")
    gen = torch.Generator().manual_seed(0)
    print(
        f"SmolLM2-135M attention: H={HEADS} KVH={KV_HEADS} hd={HEAD_DIM} bf16, block {BLOCK}, "
        f"{args.layers} layers, torch threads {torch.get_num_threads()}, median of {args.rounds} rounds"
    )
    print(f"read bandwidth (x.sum over 512 MiB bf16): {read_bandwidth_gbs():.1f} GB/s")
    header = (
        f"{'scenario':31} {'K/V MB':>6} | {'median ms: torch':>16} {'kernel':>7} {'x':>6} | "
        f"{'best ms: torch':>14} {'kernel':>7} {'x':>6} | {'GB/s: torch':>11} {'kernel':>6} | "
        f"{'max|diff|':>9}"
    )
    print(header)
    print("-" * len(header))
    for sc in SCENARIOS:
        if args.only and not any(s in sc.name for s in args.only):
            continue
        r = run(sc, args.layers, args.rounds, gen)
        print(
            f"{sc.name:31} {r['kv_mb']:6.1f} | {r['torch_ms']:16.2f} {r['kernel_ms']:7.2f} "
            f"{r['torch_ms'] / r['kernel_ms']:5.2f}x | {r['torch_best']:14.2f} {r['kernel_best']:7.2f} "
            f"{r['torch_best'] / r['kernel_best']:5.2f}x | {r['torch_gbs']:11.1f} {r['kernel_gbs']:6.1f} | "
            f"{r['diff']:9.2g}",
            flush=True,
        )


if __name__ == "__main__":
    main()
