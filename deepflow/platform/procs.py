"""What every platform process shares: logging, the lifeline to `deepflow serve`, liveness of a pid.

The lifeline is a pipe whose write end only the `deepflow serve` process holds. Every platform process
watches its read end; end of file means the launcher is gone (even by SIGKILL), and the process stops. So no
process outlives the launcher, while a cluster manager or job executor can die and be restarted without
taking its TEs along.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str, process_name: str) -> None:
    import multiprocessing

    multiprocessing.current_process().name = process_name
    level = "DEBUG" if level == "trace" else level.upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)


def http_url(host: str, port: int) -> str:
    """The base URL of a server listening on `host`:`port` (IPv6 literals in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def watch_lifeline(fd: int | None, on_lost: Callable[[], None]) -> None:
    """Call `on_lost` (on a daemon thread) once the launcher's end of the lifeline closes."""
    if fd is None:
        return

    def wait() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        on_lost()

    threading.Thread(target=wait, name="lifeline", daemon=True).start()


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM stops gracefully; SIGINT is the launcher's to handle (it stops us in order)."""
    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pid_alive(pid: int | None) -> bool:
    """True for a running process; False for none, or a zombie nobody has reaped yet."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cmdline(pid: int | None) -> list[str]:
    """The command line of a running process ([] when unknown): tells our process from a reused pid."""
    if pid is None or pid <= 0:
        return []
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def kill_quietly(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
