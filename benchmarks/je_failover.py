"""What killing one job executor costs its clients: `deepflow serve --jes J` under concurrent load, one JE
SIGKILLed mid-load, every failed request retried once.

Reproduce (the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/je_failover.py --jes 1 2

Full form:

    python benchmarks/je_failover.py [--jes 1 2] [--requests 32] [--max-tokens 48] [--port 8430]
        [--model PATH] [--out-dir DIR] [--timeout 300]

For each J: start the server (one TE, the embedded SmolLM2 unless --model), record each JE's resident memory,
send `requests` non-streaming chat completions at once (each its own connection), wait until the TE runs
at least half of them, SIGKILL the JE with the lowest id, then wait for every response (bounded by
--timeout). A request fails when its connection breaks or it gets a non-200. Each failed one is retried once,
right away; the retry's job record (`/v1/jobs/{id}`) names the JE that served it. Output: a Markdown table on
stdout and OUT_DIR/je_failover.json. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_tier import DEEPFLOW, ROOT, Server  # same server handling


def log(message: str) -> None:
    print(f"[je_failover {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def body(model: str, i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Count slowly from {i} to {i + 40}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    return False


def one_run(args: argparse.Namespace, jes: int) -> dict[str, Any]:
    cmd = [str(DEEPFLOW), "serve", "--port", str(args.port), "--jes", str(jes), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    logfile = args.out_dir / f"serve_jes{jes}.log"
    with (
        Server(cmd, args.port, logfile, args.timeout) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        model = http.get("/v1/models").json()["data"][0]["id"]

        def report() -> dict[str, Any]:
            return http.get("/v1/cluster").json()

        assert until(lambda: len(report()["job_executors"]) == jes, args.timeout), "JEs did not all join"
        je_pids = {je["je_id"]: je["pid"] for je in report()["job_executors"]}
        memory = {je_id: rss_mib(pid) for je_id, pid in sorted(je_pids.items())}
        log(f"J={jes}: JE resident memory (MiB) {memory}")
        results: dict[int, tuple[int | None, str | None]] = {}  # i -> (status, job id) or (None, error)

        def ask(i: int) -> None:
            try:
                with httpx.Client(base_url=server.url, timeout=args.timeout) as client:
                    reply = client.post("/v1/chat/completions", json=body(model, i, args.max_tokens))
                results[i] = (reply.status_code, reply.json().get("id") if reply.status_code == 200 else None)
            except (httpx.HTTPError, ValueError) as exc:
                results[i] = (None, type(exc).__name__)

        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(args.requests)]
        for thread in threads:
            thread.start()

        def running() -> int:
            return sum((te["load"] or {}).get("running", 0) for te in report()["tes"])

        busy = until(lambda: running() >= args.requests // 2, args.timeout, 0.05)
        victim = sorted(je_pids)[0]
        log(f"J={jes}: TE running >= {args.requests // 2}: {busy}; SIGKILL {victim} (pid {je_pids[victim]})")
        killed_at = time.monotonic()
        os.kill(je_pids[victim], signal.SIGKILL)
        deadline = time.monotonic() + args.timeout
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        failed = sorted(i for i in range(args.requests) if results.get(i, (None, None))[0] != 200)
        served_by: dict[int, str] = {}
        for i, (status, job_id) in results.items():
            if status == 200 and job_id:
                with httpx.Client(base_url=server.url, timeout=30) as client:
                    job = client.get(f"/v1/jobs/{job_id}")
                    if job.status_code == 200:
                        served_by[i] = job.json().get("job_executor", "?")
        # One immediate retry per failed request, all at once, timed.
        retried: dict[int, tuple[int | None, str | None, float]] = {}

        def retry(i: int) -> None:
            t0 = time.monotonic()
            try:
                with httpx.Client(base_url=server.url, timeout=args.timeout) as client:
                    reply = client.post("/v1/chat/completions", json=body(model, i, args.max_tokens))
                job_id = reply.json().get("id") if reply.status_code == 200 else None
                je = client_job_executor(server.url, job_id) if job_id else None
                retried[i] = (reply.status_code, je, time.monotonic() - t0)
            except (httpx.HTTPError, ValueError) as exc:
                retried[i] = (None, type(exc).__name__, time.monotonic() - t0)

        retry_threads = [threading.Thread(target=retry, args=(i,), daemon=True) for i in failed]
        for thread in retry_threads:
            thread.start()
        for thread in retry_threads:
            thread.join(timeout=max(1.0, deadline + args.timeout - time.monotonic()))
        restarted = until(lambda: len(report()["job_executors"]) == jes, 60)
        recovered_s = time.monotonic() - killed_at
        ok_retries = [i for i, (status, _, _) in retried.items() if status == 200]
        row = {
            "jes": jes,
            "requests": args.requests,
            "failed": len(failed),
            "retries_ok": len(ok_retries),
            "retry_jes": sorted({retried[i][1] or "?" for i in ok_retries}),
            "retries_by_je": {je: [retried[i][1] for i in ok_retries].count(je) for je in sorted(je_pids)},
            "retry_latency_max_s": round(max((r[2] for r in retried.values()), default=0.0), 2),
            "victim": victim,
            "served_by_before_kill": {je: list(served_by.values()).count(je) for je in sorted(je_pids)},
            "je_rss_mib": memory,
            "victim_back": restarted,
            "until_all_jes_back_s": round(recovered_s, 1),
            "errors": sorted({str(results.get(i, (None, "no answer"))[1]) for i in failed}),
        }
        log(f"J={jes}: {json.dumps(row)}")
        return row


def client_job_executor(url: str, job_id: str) -> str | None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(20):  # job records reach the shared store every 100 ms
            job = client.get(f"/v1/jobs/{job_id}")
            if job.status_code == 200:
                return job.json().get("job_executor")
            time.sleep(0.1)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--port", type=int, default=8430)
    p.add_argument("--model", default=None)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "je_failover")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [one_run(args, jes) for jes in args.jes]
    (args.out_dir / "je_failover.json").write_text(json.dumps(rows, indent=2))
    head = "| JEs | in flight | failed by the kill | retried OK (once) | retries served by | retry max (s) |"
    print(head + " JE RSS (MiB) |")
    print("|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["je_rss_mib"].items() if v is not None)
        by = ", ".join(f"{k} {v}" for k, v in r["retries_by_je"].items())
        print(f"| {r['jes']} | {r['requests']} | {r['failed']} | {r['retries_ok']}/{r['failed']} | {by} |"
              f" {r['retry_latency_max_s']} | {rss} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
