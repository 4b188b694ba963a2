"""`deepflow serve`: start the cluster manager and the job executors, keep them up, stop them in order.

The launcher owns three things: the listening socket (bound here, inherited by every JE, so a JE restart
drops no connection attempt), the lifeline pipe (its write end lives only here: when this process dies, even
by SIGKILL, every platform process sees end of file and stops), and the two kinds of processes it restarts
when they die, the CM and the JEs. TEs are the CM's. Stop (Ctrl-C, SIGTERM): JEs first (they drain their
streams for `shutdown_timeout` seconds), then the CM (which stops its TEs), then whatever is left is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from deepflow.platform.procs import http_url, kill_quietly
from deepflow.platform.spec import ClusterSpec

logger = logging.getLogger("deepflow.serve")

RESTART_BACKOFF = (0.5, 30.0)  # first delay, cap: doubled for each restart within a minute


class Launcher:
    def __init__(self, spec: ClusterSpec, api_key: str | None) -> None:
        self.spec = spec
        self.api_key = api_key
        self.run_dir = Path(tempfile.mkdtemp(prefix="deepflow-"))
        self.stop_requested = threading.Event()
        self.force = threading.Event()  # a second Ctrl-C: kill instead of waiting
        self._restarts: dict[str, list[float]] = {}  # process name -> recent exit times
        self._restart_at: dict[str, float] = {}
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        self.listener = socket.create_server((spec.host, spec.port), family=family, backlog=2048)
        self.listener.set_inheritable(True)
        self.port = self.listener.getsockname()[1]
        self.url = http_url(spec.host, self.port)
        self._lifeline_read, self._lifeline_write = os.pipe()
        os.set_inheritable(self._lifeline_read, True)
        self.cm: subprocess.Popen[bytes] | None = None
        self.jes: dict[str, subprocess.Popen[bytes]] = {}

    # ---- processes -------------------------------------------------------------------------------------
    def _common(self) -> list[str]:
        return [
            "--spec",
            self.spec.encode(),
            "--run-dir",
            str(self.run_dir),
            "--log-level",
            self.spec.log_level,
        ]

    def start_cm(self) -> None:
        self.cm = subprocess.Popen(
            [sys.executable, "-m", "deepflow.platform.cluster", *self._common(),
             "--lifeline-fd", str(self._lifeline_read)],
            pass_fds=(self._lifeline_read,),
            start_new_session=True,
        )  # fmt: skip
        logger.info("cluster manager started (pid %d)", self.cm.pid)

    def start_je(self, je_id: str) -> None:
        env = dict(os.environ)
        env.pop("DEEPFLOW_API_KEY", None)
        if self.api_key:
            env["DEEPFLOW_API_KEY"] = self.api_key  # not on the command line, where `ps` shows it
        # The JEs' metrics live in files there, so /metrics on the shared port adds up every JE's.
        metrics_dir = self.run_dir / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        self.jes[je_id] = subprocess.Popen(
            [sys.executable, "-m", "deepflow.platform.je", *self._common(), "--je-id", je_id,
             "--listen-fd", str(self.listener.fileno()), "--lifeline-fd", str(self._lifeline_read)],
            pass_fds=(self._lifeline_read, self.listener.fileno()),
            start_new_session=True,
            env=env,
        )  # fmt: skip
        logger.info("job executor %s started (pid %d)", je_id, self.jes[je_id].pid)

    def supervise_once(self) -> None:
        """Restart the CM or a JE that exited while we were not stopping (with a backoff)."""
        if self.cm is not None and self._due("cluster manager", self.cm):
            self.start_cm()
        for je_id, process in list(self.jes.items()):
            if self._due(f"job executor {je_id}", process):
                self.start_je(je_id)

    def _due(self, name: str, process: subprocess.Popen[bytes]) -> bool:
        """True when `process` exited and its restart delay has passed."""
        if process.poll() is None:
            return False
        now = time.monotonic()
        if name not in self._restart_at:
            recent = [t for t in self._restarts.get(name, []) if now - t < 60] + [now]
            self._restarts[name] = recent
            first, cap = RESTART_BACKOFF
            delay = min(cap, first * 2 ** (len(recent) - 1))
            self._restart_at[name] = now + delay
            logger.warning("%s exited with code %s; restarting it in %.1f s", name, process.returncode, delay)
        if now < self._restart_at[name]:
            return False
        del self._restart_at[name]
        return True

    def wait_ready(self, timeout: float = 900.0) -> bool:
        """Until /health answers 200 (every model has a live TE behind a serving JE), or a stop."""
        deadline = time.monotonic() + timeout
        while not self.stop_requested.is_set() and time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            self.supervise_once()
            self.stop_requested.wait(0.2)
        return False

    # ---- run and stop ----------------------------------------------------------------------------------
    def run(self) -> int:
        names = ",".join(m.name for m in self.spec.models)
        logger.info("starting DeepFlow for model %s on %s", names, self.url)
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            self.start_cm()
            for i in range(self.spec.job_executors):
                self.start_je(f"je-{i}")
            if not self.wait_ready():
                if not self.stop_requested.is_set():
                    logger.error("DeepFlow did not become ready")
                    return 1
                return 0
            logger.info("DeepFlow ready: %s (model %s)", self.url, names)
            while not self.stop_requested.wait(0.2):
                self.supervise_once()
            return 0
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, *_: object) -> None:
        if self.stop_requested.is_set():
            logger.warning("second stop signal: killing every process now")
            self.force.set()
        self.stop_requested.set()

    def stop(self) -> None:
        logger.info("shutting the platform down")
        for process in self.jes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        _wait_all(list(self.jes.values()), self.spec.shutdown_timeout + 10, self.force)
        if self.cm is not None and self.cm.poll() is None:
            self.cm.send_signal(signal.SIGTERM)
            _wait_all([self.cm], 40, self.force)
        os.close(self._lifeline_write)  # whatever is left (e.g. TEs of a CM that died) stops now
        self.listener.close()
        time.sleep(0.2)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        logger.info("DeepFlow stopped")


def _wait_all(processes: list[subprocess.Popen[bytes]], timeout: float, force: threading.Event) -> None:
    """Wait for every process to exit; kill those still running at the deadline or when `force` is set."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline and not force.is_set():
        time.sleep(0.05)
    for process in processes:
        if process.poll() is None:
            logger.warning("pid %d did not stop in time; killing it", process.pid)
            kill_quietly(process.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
