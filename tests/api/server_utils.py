"""Start a real `deepflow serve` process on a free port, and read its Prometheus metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READY = re.compile(r"DeepFlow ready: (http://\S+) \(model (\S+)\)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str = ""
    model: str = ""
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        if self.reader is not None:
            self.reader.join(timeout=10)  # the last log lines
        return code


def smollm2_args(smollm2_dir: Path) -> list[str]:
    """float32 for exact greedy comparisons; a small KV pool and batch keep the machine responsive."""
    return [
        "--model",
        str(smollm2_dir),
        "--dtype",
        "float32",
        "--max-num-seqs",
        "4",
        "--kv-cache-memory",
        "64MiB",
        "--api-key",
        API_KEY,
        "--log-level",
        "warning",
    ]


def start_server(extra_args: list[str], timeout: float = 240.0) -> ServerProcess:
    """Run `deepflow serve --port 0` and wait for its ready line, which carries the port it got."""
    env = {k: v for k, v in os.environ.items() if k != "DEEPFLOW_API_KEY"}
    process = subprocess.Popen(
        [sys.executable, "-m", "deepflow.cli", "serve", "--port", "0", *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    server = ServerProcess(process)
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.lines.append(line)
            match = READY.search(line)
            if match:
                server.url, server.model = match.group(1), match.group(2)
                ready.set()
        ready.set()

    server.reader = threading.Thread(target=pump, daemon=True)
    server.reader.start()
    if not ready.wait(timeout) or not server.url:
        process.kill()
        raise RuntimeError(f"deepflow serve did not become ready:\n{server.log}")
    return server


def stop_cleanly(server: ServerProcess) -> None:
    """SIGTERM, then the server must exit 0 after shutting its engine down."""
    code = server.stop()
    assert code == 0, f"server exited with {code}:\n{server.log}"
    assert "DeepFlow stopped" in server.log


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, or None when absent."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest and rest[0] not in "{ ":
            continue  # a longer metric name with this prefix
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def get_metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text  # behind the key (no --metrics-public)
