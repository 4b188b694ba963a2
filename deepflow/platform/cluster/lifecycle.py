"""A TE's lifecycle as the cluster manager drives it: a pure state machine (no clock, processes or sockets).

    STARTING ──heartbeat──▶ READY ──drain──▶ DRAINING ──drained / exited──▶ STOPPED
       │                      │                 │
       └──exited / timeout────┴──▶ DEAD ──restart (after backoff)──▶ STARTING (incarnation + 1)

Every event names the incarnation it is about; an event of an older incarnation (a heartbeat still in
flight from a TE that was restarted, an exit of a process already replaced) is ignored, so a late message
can never mark a new incarnation ready or dead. Timeouts are the caller's clock passed in: a STARTING TE
that is not ready within `startup_timeout_s`, a READY one silent for `heartbeat_timeout_s`, a DRAINING one
not done within `drain_timeout_s` are to be killed (`check` says so; the kill's exit event then moves it).

Restarts back off: a TE that dies within `stable_after_s` of starting counts a failure, and the n-th
consecutive one waits `min(backoff_base_s · 2^(n−1), backoff_max_s)`; a TE that stays up for
`stable_after_s` is healthy again and its count is reset. A crash loop costs little; one crash after a day
restarts at once. The same machine runs under local processes and under Ray (the backend only starts,
stops and watches; it never decides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Action", "ActionKind", "LifecycleConfig", "TELifecycle", "TEState", "Transition"]


class TEState(StrEnum):
    STARTING = "starting"  # asked for; its process may still be loading the model
    READY = "ready"  # heartbeating; routable
    DRAINING = "draining"  # scaled down: no new requests, the running ones finish
    DEAD = "dead"  # exited or killed; restarted after its backoff
    STOPPED = "stopped"  # gone for good (drained, scaled away, or the cluster stopping)


class ActionKind(StrEnum):
    SPAWN = "spawn"  # start the next incarnation (the backend's start)
    KILL = "kill"  # the current incarnation must go (hung, silent, or a drain that overran)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    incarnation: int
    reason: str


@dataclass(frozen=True)
class Transition:
    at: float
    incarnation: int
    before: TEState | None
    after: TEState
    reason: str


@dataclass(frozen=True)
class LifecycleConfig:
    heartbeat_timeout_s: float = 30.0  # a step on a loaded CPU can take seconds
    startup_timeout_s: float = 600.0
    drain_timeout_s: float = 600.0
    stable_after_s: float = 60.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass
class TELifecycle:
    te_id: str
    config: LifecycleConfig = field(default_factory=LifecycleConfig)
    state: TEState | None = None  # None: never started
    incarnation: int = -1
    failures: int = 0  # consecutive early deaths
    started_at: float | None = None
    ready_at: float | None = None
    last_heartbeat: float | None = None
    drain_started: float | None = None
    restart_at: float | None = None
    stopping: bool = False  # the cluster is stopping: no restarts
    history: list[Transition] = field(default_factory=list)
    max_history: int = 32

    # ---- events ---------------------------------------------------------------------------------------
    def spawn(self, now: float, incarnation: int | None = None) -> int:
        """A new incarnation was started (first start, restart, or an adopted live TE's own number)."""
        if self.state in (TEState.STARTING, TEState.READY, TEState.DRAINING):
            raise RuntimeError(f"{self.te_id}: spawn while {self.state}")
        if self.state is TEState.STOPPED:
            raise RuntimeError(f"{self.te_id}: spawn after it stopped")
        self.incarnation = self.incarnation + 1 if incarnation is None else max(incarnation, self.incarnation)
        self.started_at = now
        self.ready_at = self.last_heartbeat = self.restart_at = None
        self._move(now, TEState.STARTING, "started")
        return self.incarnation

    def heartbeat(self, now: float, incarnation: int) -> bool:
        """A heartbeat; True if it counts (the current incarnation, alive)."""
        if incarnation != self.incarnation or self.state not in (
            TEState.STARTING,
            TEState.READY,
            TEState.DRAINING,
        ):
            return False
        self.last_heartbeat = now
        if self.state is TEState.STARTING:
            self.ready_at = now
            self._move(now, TEState.READY, "first heartbeat")
        elif self.ready_at is not None and now - self.ready_at >= self.config.stable_after_s:
            self.failures = 0  # up long enough: the next crash is not part of a loop
        return True

    def exited(self, now: float, incarnation: int, reason: str) -> bool:
        """The incarnation's process is gone (exit, kill, node lost); True if it was the current one."""
        if incarnation != self.incarnation or self.state in (TEState.DEAD, TEState.STOPPED, None):
            return False
        if self.state is TEState.DRAINING or self.stopping:
            self._move(now, TEState.STOPPED, reason)
            return True
        up_since = self.ready_at if self.ready_at is not None else self.started_at
        early = up_since is None or now - up_since < self.config.stable_after_s
        self.failures = self.failures + 1 if early else 1
        delay = min(self.config.backoff_base_s * 2 ** (self.failures - 1), self.config.backoff_max_s)
        self.restart_at = now + delay
        self._move(now, TEState.DEAD, f"{reason}; restart in {delay:g} s")
        return True

    def drain(self, now: float) -> list[Action]:
        """Scale this TE away: a ready one drains; one not serving yet (or dead) stops at once."""
        if self.state is TEState.READY:
            self.drain_started = now
            self._move(now, TEState.DRAINING, "scaled down")
            return []
        if self.state is TEState.STARTING:
            self._move(now, TEState.STOPPED, "scaled down before it was ready")
            return [Action(ActionKind.KILL, self.incarnation, "scaled down before it was ready")]
        if self.state in (TEState.DEAD, None):
            self._move(now, TEState.STOPPED, "scaled down while not running")
        return []

    def drained(self, now: float) -> list[Action]:
        """A draining TE has no request left: stop it."""
        if self.state is not TEState.DRAINING:
            return []
        self._move(now, TEState.STOPPED, "drained")
        return [Action(ActionKind.KILL, self.incarnation, "drained")]

    def stop_all(self, now: float) -> list[Action]:
        """The cluster stops: no more restarts; a running TE is to be stopped."""
        self.stopping = True
        if self.state in (TEState.STARTING, TEState.READY, TEState.DRAINING):
            return [Action(ActionKind.KILL, self.incarnation, "cluster stopping")]
        if self.state is TEState.DEAD:
            self._move(now, TEState.STOPPED, "cluster stopping")
        return []

    # ---- time ------------------------------------------------------------------------------------------
    def check(self, now: float) -> list[Action]:
        """What the caller must do now: kill a hung/silent incarnation, or spawn the next one."""
        c = self.config
        kill = None
        if self.state is TEState.STARTING and self.started_at is not None:
            if now - self.started_at > c.startup_timeout_s:
                kill = f"not ready within {c.startup_timeout_s:g} s"
        elif self.state is TEState.READY and self.last_heartbeat is not None:
            if now - self.last_heartbeat > c.heartbeat_timeout_s:
                kill = f"no heartbeat for {c.heartbeat_timeout_s:g} s"
        elif self.state is TEState.DRAINING and self.drain_started is not None:
            if now - self.drain_started > c.drain_timeout_s:
                kill = f"drain overran {c.drain_timeout_s:g} s"
        elif self.state is TEState.DEAD and not self.stopping and now >= (self.restart_at or float("inf")):
            return [Action(ActionKind.SPAWN, self.incarnation + 1, "restart")]
        return [] if kill is None else [Action(ActionKind.KILL, self.incarnation, kill)]

    @property
    def serving(self) -> bool:
        return self.state is TEState.READY

    def _move(self, now: float, after: TEState, reason: str) -> None:
        self.history.append(Transition(now, self.incarnation, self.state, after, reason))
        del self.history[: -self.max_history]
        self.state = after
