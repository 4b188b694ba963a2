"""DistFlow transfer bandwidth between two processes, on each backend, against memcpy in the same run.

Reproduce:

    .venv/bin/python benchmarks/distflow.py [--sizes-mib 1 4 16 64 256] [--min-reps 3] [--json OUT.json]

A target process (spawned) registers one region in shared memory, sized for the largest transfer. This
process (the initiator) has two agents linked to it, one over shared memory and one over TCP loopback
(their data paths differ; the target is the same), and a private source and read-back buffer, all
pre-faulted. For every size: a plain memcpy (`numpy.copyto`) of the same bytes between two private
buffers, and a write (push) and a read (pull) of one contiguous span on each backend; each measured from
submit to the completed handle (the peer's acknowledgement included), median of the repetitions (at
least `--min-reps`, more for small sizes: ~1 GiB moved per cell), the cells taking turns repetition by
repetition (the machine is shared: load bursts then hit all of them). One more row moves 64 MiB as 4,096
non-adjacent 16 KiB spans (KV-block shaped: nothing coalesces). `memcpy_to_shm` is the same memcpy into a
/dev/shm segment (4 KiB pages, where large numpy arrays get huge pages): the ceiling of an in-place copy.
Targets: shm write of 64 MiB >= 0.7x the memcpy of the same run; TCP loopback >= 1 GB/s. Where the
optional Mooncake transfer engine is installed (`mooncake_backend.available()`), its TCP path is measured
too (`--no-mooncake` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np

from deepflow.flow import (
    Backend,
    LayoutDescriptor,
    TransferAgent,
    TransferEntry,
    allocate_shared,
    mooncake_backend,
)

MiB = 1 << 20
LAYOUT = LayoutDescriptor(
    model_id="bench", dtype="bfloat16", num_layers=1, num_kv_heads=1, head_dim=64, block_size=16
)
SPANS, SPAN_BYTES = 4096, 16 * 1024


def _target(conn: Connection, size: int, mooncake: bool) -> None:
    seg = allocate_shared(size, "bench")
    seg.array[:] = 1
    agent = TransferAgent("target", LAYOUT, mooncake=mooncake)
    agent.register("dst", seg)
    conn.send(agent.address)
    conn.recv()  # until the initiator is done
    agent.close()
    seg.close()


def _measure(cells: dict[str, Callable[[], None]], nbytes: int, reps: int) -> dict[str, tuple[float, float]]:
    """(median, best) GB/s of each cell. The cells take turns, one repetition each, so a burst of other
    load on the shared machine hits memcpy and the transfers alike and their ratio stays meaningful."""
    for fn in cells.values():
        fn()  # warm-up (first touch of mappings, socket buffers)
    times: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(reps):
        for name, fn in cells.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (nbytes / statistics.median(t) / 1e9, nbytes / min(t) / 1e9) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-mooncake", action="store_true", help="leave out the optional Mooncake path")
    args = parser.parse_args()
    mooncake = not args.no_mooncake and mooncake_backend.available()
    backends = [Backend.SHM, Backend.TCP] + ([Backend.MOONCAKE] if mooncake else [])
    largest = max(max(args.sizes_mib) * MiB, 2 * SPANS * SPAN_BYTES)

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_target, args=(child, largest, mooncake), daemon=True)
    proc.start()
    if not conn.poll(60.0):
        raise SystemExit("the target process did not start")
    address = conn.recv()

    src = np.random.default_rng(0).integers(0, 256, largest, dtype=np.uint8)
    back = np.ones(largest, dtype=np.uint8)
    plain = np.ones(largest, dtype=np.uint8)
    # Reference: memcpy into a shared-memory segment of this process. /dev/shm pages are 4 KiB where
    # numpy's large arrays get transparent huge pages, so this bounds what an in-place shm copy can reach.
    local_shm = allocate_shared(largest, "bench-ref")
    local_shm.array[:] = 1
    agents = {}
    for backend in backends:
        # One Mooncake engine per process: only the Mooncake initiator starts it.
        agent = TransferAgent(f"initiator-{backend.value}", LAYOUT, mooncake=backend is Backend.MOONCAKE)
        agent.register("src", src)
        agent.register("back", back)
        peer = agent.connect(address, backend=backend)
        assert peer.backend is backend
        agents[backend] = agent

    def move(backend: Backend, entries: list[TransferEntry], read: bool) -> Callable[[], None]:
        agent = agents[backend]
        op = agent.read if read else agent.write
        return lambda: op("target", entries).wait(120.0)

    rows = []
    for size_mib in args.sizes_mib:
        n = size_mib * MiB
        reps = max(args.min_reps, min(100, (1 << 30) // n))
        write = [TransferEntry("src", 0, "dst", 0, n)]
        read = [TransferEntry("dst", 0, "back", 0, n)]
        cells: dict[str, Callable[[], None]] = {
            "memcpy": lambda n=n: np.copyto(plain[:n], src[:n]),
            "memcpy_to_shm": lambda n=n: np.copyto(local_shm.array[:n], src[:n]),
        }
        for backend in backends:
            cells[f"{backend.value}_write"] = move(backend, write, False)
            cells[f"{backend.value}_read"] = move(backend, read, True)
        rows.append({"size_mib": size_mib, "spans": 1, "reps": reps, **_measure(cells, n, reps)})

    # KV-block shaped: 4,096 spans of 16 KiB at a 32 KiB stride (no two adjacent), 64 MiB in all.
    n = SPANS * SPAN_BYTES
    offsets = [2 * i * SPAN_BYTES for i in range(SPANS)]
    write = [TransferEntry("src", o, "dst", o, SPAN_BYTES) for o in offsets]
    read = [TransferEntry("dst", o, "back", o, SPAN_BYTES) for o in offsets]
    spans = [(o, o + SPAN_BYTES) for o in offsets]

    def copy_spans() -> None:
        for a, b in spans:
            np.copyto(plain[a:b], src[a:b])

    reps = max(args.min_reps, 10)

    def copy_spans_to_shm() -> None:
        for a, b in spans:
            np.copyto(local_shm.array[a:b], src[a:b])

    cells = {"memcpy": copy_spans, "memcpy_to_shm": copy_spans_to_shm}
    for backend in backends:
        cells[f"{backend.value}_write"] = move(backend, write, False)
        cells[f"{backend.value}_read"] = move(backend, read, True)
    rows.append({"size_mib": n // MiB, "spans": SPANS, "reps": reps, **_measure(cells, n, reps)})

    for agent in agents.values():
        agent.close()
    conn.send("done")
    proc.join(30.0)

    local_shm.close()
    cols = ["memcpy", "memcpy_to_shm"] + [f"{b.value}_{op}" for b in backends for op in ("write", "read")]
    load = os.getloadavg()[0]
    cpus = f"{os.cpu_count()} CPUs, {platform.machine()}, load average {load:.1f} at the end"
    print(f"DistFlow bandwidth, GB/s (median of reps; 1 GB = 1e9 B), {cpus}")
    print(f"| size | spans | reps | {' | '.join(cols)} | shm write / memcpy | shm write / memcpy_to_shm |")
    print("|---:|---:|---:|" + "---:|" * len(cols) + "---:|---:|")
    for r in rows:
        cells = " | ".join(f"{r[c][0]:.2f}" for c in cols)  # type: ignore[index]
        ratio = r["shm_write"][0] / r["memcpy"][0]  # type: ignore[index]
        ratio_shm = r["shm_write"][0] / r["memcpy_to_shm"][0]  # type: ignore[index]
        print(
            f"| {r['size_mib']} MiB | {r['spans']} | {r['reps']} | {cells} | {ratio:.2f} | {ratio_shm:.2f} |"
        )

    single = {r["size_mib"]: r for r in rows if r["spans"] == 1}
    checks = {}
    if 64 in single:
        r = single[64]
        checks["shm_64MiB_vs_memcpy >= 0.7"] = r["shm_write"][0] / r["memcpy"][0]  # type: ignore[index]
    big = [r for r in rows if r["spans"] == 1 and r["size_mib"] >= 16]  # type: ignore[operator]
    if big:
        checks["tcp_write_GBps >= 1.0 (min over >= 16 MiB)"] = min(r["tcp_write"][0] for r in big)  # type: ignore[index]
    for name, value in checks.items():
        bound = float(name.split(">=")[1].split()[0])
        print(f"{'PASS' if value >= bound else 'FAIL'} {name}: {value:.2f}")

    if args.json:
        result = {
            "benchmark": "distflow",
            "argv": sys.argv,
            "cpus": os.cpu_count(),
            "load_average_1min": load,
            "columns": {c: "GB/s [median, best]" for c in cols},
            "rows": rows,
            "checks": checks,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
