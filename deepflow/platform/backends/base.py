"""The TE backend contract: start an incarnation, tell whether it lives, stop it, find it again."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["TEBackend", "TEHandle", "TELaunch", "te_command"]


@dataclass(frozen=True)
class TELaunch:
    """One TE incarnation to start."""

    te_id: str
    incarnation: int
    model_name: str
    engine_config_json: str  # EngineConfig as JSON (the TE decodes it)
    cm_address: str
    address: str  # where the TE's ROUTER listens for JEs
    log_level: str = "info"
    lifeline_fd: int | None = None  # local only: EOF on it stops the TE (the launcher is gone)
    # Placement (Ray): resources the TE needs (e.g. {"CPU": 2}, a custom node label {"node:gpu-a": 0.01}).
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class TEHandle:
    """A started incarnation, as the backend knows it. `where` names its node (host or Ray node id)."""

    te_id: str
    incarnation: int
    where: str
    pid: int | None = None
    ref: object | None = None  # the backend's own object (a Popen, an actor handle)


class TEBackend(Protocol):
    name: str

    def start(self, launch: TELaunch) -> TEHandle: ...

    def is_alive(self, handle: TEHandle) -> bool: ...

    def stop(self, handle: TEHandle, *, kill: bool = False) -> None:
        """SIGTERM (the TE finishes its step and exits) or, with `kill`, SIGKILL. Never blocks long."""
        ...

    def adopt(self, te_id: str, incarnation: int, pid: int | None) -> TEHandle | None:
        """A restarted CM finds a live incarnation it had started (None when it is gone)."""
        ...

    def close(self) -> None: ...


def te_command(launch: TELaunch, python: str = sys.executable) -> list[str]:
    command = [
        python, "-m", "deepflow.platform.te",
        "--te-id", launch.te_id,
        "--incarnation", str(launch.incarnation),
        "--model-name", launch.model_name,
        "--engine-config", launch.engine_config_json,
        "--cm-address", launch.cm_address,
        "--address", launch.address,
        "--log-level", launch.log_level,
    ]  # fmt: skip
    if launch.lifeline_fd is not None:
        command += ["--lifeline-fd", str(launch.lifeline_fd)]
    return command
