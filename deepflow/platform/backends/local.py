"""TEs as subprocesses of the cluster manager's host (the default: one machine, no Ray)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess

from deepflow.platform.backends.base import TEHandle, TELaunch, te_command
from deepflow.platform.procs import cmdline, kill_quietly, pid_alive

__all__ = ["LocalBackend"]


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self.host = socket.gethostname()

    def start(self, launch: TELaunch) -> TEHandle:
        pass_fds = () if launch.lifeline_fd is None else (launch.lifeline_fd,)
        # Its own session: a Ctrl-C at the launcher's terminal reaches the launcher, which stops TEs in order.
        process = subprocess.Popen(te_command(launch), pass_fds=pass_fds, start_new_session=True)
        return TEHandle(launch.te_id, launch.incarnation, self.host, pid=process.pid, ref=process)

    def is_alive(self, handle: TEHandle) -> bool:
        process = handle.ref
        if isinstance(process, subprocess.Popen):
            return process.poll() is None
        return pid_alive(handle.pid) and self._is_ours(handle.te_id, handle.incarnation, handle.pid)

    def stop(self, handle: TEHandle, *, kill: bool = False) -> None:
        kill_quietly(handle.pid, signal.SIGKILL if kill else signal.SIGTERM)

    def adopt(self, te_id: str, incarnation: int, pid: int | None) -> TEHandle | None:
        """A live pid is ours only if its command line is this TE's incarnation (pids are reused)."""
        if not pid_alive(pid) or not self._is_ours(te_id, incarnation, pid):
            return None
        return TEHandle(te_id, incarnation, self.host, pid=pid)

    @staticmethod
    def _is_ours(te_id: str, incarnation: int, pid: int | None) -> bool:
        argv = cmdline(pid)
        with contextlib.suppress(ValueError, IndexError):
            return (
                "deepflow.platform.te" in argv
                and argv[argv.index("--te-id") + 1] == te_id
                and argv[argv.index("--incarnation") + 1] == str(incarnation)
            )
        return False

    def close(self) -> None:
        pass
