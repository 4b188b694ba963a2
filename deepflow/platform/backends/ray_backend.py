"""TEs on a Ray cluster: each incarnation is a named, detached actor that holds its TE process.

Ray places the actor (by the launch's resources: CPUs and, to pin a TE to a node, a custom resource the
node was started with, e.g. `ray start --resources '{"node_b": 1}'`); the actor starts the same
`python -m deepflow.platform.te` command on that node and ties the TE's life to its own (PR_SET_PDEATHSIG:
if the actor process dies, so does the TE; a node that dies takes both). The TE heartbeats to the CM as
today; Ray adds a second signal — a dead actor answers nothing — and the names let a restarted CM find
its live TEs (`adopt`) without pids. Actor names: `te:<te_id>:<incarnation>` in namespace `deepflow`.

The deepflow package must be importable at the same interpreter path on every node (one venv layout per
cluster, as with vLLM on Ray); `docs/multi-node.md` says how.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
from typing import Any

from deepflow.platform.backends.base import TEHandle, TELaunch, te_command

__all__ = ["RayBackend", "RayNotInstalled", "actor_name"]

NAMESPACE = "deepflow"
CALL_TIMEOUT_S = 30.0  # every call to an actor has a bound: a dead node must not hang the CM


class RayNotInstalled(RuntimeError):
    def __init__(self) -> None:
        super().__init__("the Ray backend needs ray: pip install 'deepflow[ray]' (or pip install ray)")


def actor_name(te_id: str, incarnation: int) -> str:
    return f"te:{te_id}:{incarnation}"


def _die_with_parent() -> None:
    """In the TE child, before exec: SIGKILL when the actor process (its parent) dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TEHost:
    """The actor body (wrapped by ray.remote at first use): one TE process on this node."""

    def __init__(self, argv: list[str]) -> None:
        import socket

        import ray

        self.process = subprocess.Popen(argv, preexec_fn=_die_with_parent)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()

    def info(self) -> tuple[str, str, int]:
        return self.node_id, self.host, self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        return self.process.poll()

    def signal(self, kill: bool) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class RayBackend:
    name = "ray"

    def __init__(self, address: str = "auto", *, init_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RayNotInstalled() from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, **(init_kwargs or {}))
        self._remote = ray.remote(TEHost)

    # ---- the TEBackend contract -----------------------------------------------------------------------
    def start(self, launch: TELaunch) -> TEHandle:
        return self.start_argv(launch.te_id, launch.incarnation, te_command(launch), launch.resources)

    def start_argv(
        self, te_id: str, incarnation: int, argv: list[str], resources: dict[str, float] | None = None
    ) -> TEHandle:
        """Start `argv` as the TE process of `te_id`'s `incarnation` wherever `resources` fit."""
        resources = dict(resources or {})
        num_cpus = resources.pop("CPU", 0)
        actor = self._remote.options(
            name=actor_name(te_id, incarnation),
            namespace=NAMESPACE,
            lifetime="detached",  # outlives the CM: a restarted CM adopts it
            max_restarts=0,  # the CM restarts TEs (as a new incarnation), never Ray behind its back
            num_cpus=num_cpus,
            resources=resources,
        ).remote(argv)
        node_id, host, pid = self.ray.get(actor.info.remote(), timeout=CALL_TIMEOUT_S)
        return TEHandle(te_id, incarnation, where=f"{host}/{node_id[:12]}", pid=pid, ref=actor)

    def is_alive(self, handle: TEHandle) -> bool:
        try:
            return bool(self.ray.get(handle.ref.alive.remote(), timeout=CALL_TIMEOUT_S))
        except Exception:
            return False

    def stop(self, handle: TEHandle, *, kill: bool = False) -> None:
        actor = handle.ref
        with contextlib.suppress(Exception):
            self.ray.get(actor.signal.remote(kill), timeout=CALL_TIMEOUT_S)
        if kill:
            self.release(handle)

    def release(self, handle: TEHandle) -> None:
        """Free the actor (and its resources) once its TE has exited: the CM calls this on every exit."""
        with contextlib.suppress(Exception):
            self.ray.kill(handle.ref, no_restart=True)

    def adopt(self, te_id: str, incarnation: int, pid: int | None = None) -> TEHandle | None:
        try:
            actor = self.ray.get_actor(actor_name(te_id, incarnation), namespace=NAMESPACE)
            node_id, host, actor_pid = self.ray.get(actor.info.remote(), timeout=CALL_TIMEOUT_S)
        except Exception:
            return None
        handle = TEHandle(te_id, incarnation, where=f"{host}/{node_id[:12]}", pid=actor_pid, ref=actor)
        return handle if self.is_alive(handle) else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.shutdown()
