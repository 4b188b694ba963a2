"""The TE lifecycle state machine on a fake clock: every transition, backoff, stale incarnations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.platform.cluster.lifecycle import ActionKind, LifecycleConfig, TELifecycle, TEState

CFG = LifecycleConfig(
    heartbeat_timeout_s=30, startup_timeout_s=100, drain_timeout_s=50, stable_after_s=60,
    backoff_base_s=1, backoff_max_s=8,
)  # fmt: skip


def started(now: float = 0.0) -> TELifecycle:
    lc = TELifecycle("te-0", CFG)
    assert lc.spawn(now) == 0 and lc.state is TEState.STARTING
    return lc


def test_start_ready_drain_stop():
    lc = started()
    assert lc.heartbeat(5.0, 0) and lc.state is TEState.READY and lc.serving
    assert lc.drain(10.0) == [] and lc.state is TEState.DRAINING
    (kill,) = lc.drained(20.0)
    assert kill.kind is ActionKind.KILL and lc.state is TEState.STOPPED
    assert not lc.exited(21.0, 0, "stopped")  # the kill's exit changes nothing
    assert [(t.before, t.after) for t in lc.history] == [
        (None, TEState.STARTING), (TEState.STARTING, TEState.READY), (TEState.READY, TEState.DRAINING),
        (TEState.DRAINING, TEState.STOPPED),
    ]  # fmt: skip


def test_a_draining_te_that_exits_is_stopped_not_restarted():
    lc = started()
    lc.heartbeat(1.0, 0)
    lc.drain(2.0)
    assert lc.exited(3.0, 0, "exit 0") and lc.state is TEState.STOPPED
    assert lc.check(100.0) == []


def test_crash_loop_backs_off_exponentially_with_a_cap_and_resets_when_stable():
    lc = started()
    now = 0.0
    delays = []
    for _ in range(6):
        now += 2.0
        assert lc.exited(now, lc.incarnation, "segfault")
        delays.append(lc.restart_at - now)
        assert lc.check(lc.restart_at - 0.01) == []
        now = lc.restart_at
        (spawn,) = lc.check(now)
        assert spawn.kind is ActionKind.SPAWN and spawn.incarnation == lc.incarnation + 1
        lc.spawn(now)
    assert delays == [1, 2, 4, 8, 8, 8]
    lc.heartbeat(now + 1, lc.incarnation)
    lc.heartbeat(now + 62, lc.incarnation)  # up for a stable minute: healthy again
    assert lc.failures == 0
    lc.exited(now + 1000, lc.incarnation, "oom")
    assert lc.restart_at == now + 1000 + 1  # a crash after a long life restarts at once (base delay)


def test_stale_incarnations_are_ignored():
    lc = started()
    lc.exited(1.0, 0, "crash")
    lc.spawn(lc.restart_at)
    assert lc.incarnation == 1
    assert not lc.heartbeat(3.0, 0)  # a heartbeat of the dead incarnation still in flight
    assert lc.state is TEState.STARTING
    assert not lc.exited(3.5, 0, "late exit of the old process")
    assert lc.state is TEState.STARTING
    assert lc.heartbeat(4.0, 1) and lc.state is TEState.READY


def test_timeouts_ask_for_a_kill():
    lc = started()
    assert lc.check(100.0) == []
    (kill,) = lc.check(100.5)
    assert kill.kind is ActionKind.KILL and "ready" in kill.reason
    lc2 = started()
    lc2.heartbeat(1.0, 0)
    assert lc2.check(31.0) == []
    (kill,) = lc2.check(31.5)
    assert "heartbeat" in kill.reason
    lc2.heartbeat(40.0, 0)
    lc2.drain(41.0)
    (kill,) = lc2.check(92.0)
    assert "drain" in kill.reason


def test_scaling_away_a_starting_or_dead_te_stops_it_at_once():
    lc = started()
    (kill,) = lc.drain(1.0)
    assert kill.kind is ActionKind.KILL and lc.state is TEState.STOPPED
    dead = started()
    dead.exited(1.0, 0, "crash")
    assert dead.drain(2.0) == [] and dead.state is TEState.STOPPED
    assert dead.check(100.0) == []


def test_stopping_the_cluster_ends_restarts():
    lc = started()
    lc.heartbeat(1.0, 0)
    (kill,) = lc.stop_all(2.0)
    assert kill.kind is ActionKind.KILL
    assert lc.exited(3.0, 0, "stopped") and lc.state is TEState.STOPPED
    dead = started()
    dead.exited(1.0, 0, "crash")
    assert dead.stop_all(1.5) == [] and dead.state is TEState.STOPPED


def test_an_adopted_te_keeps_its_own_incarnation():
    lc = TELifecycle("te-3", CFG)
    assert lc.spawn(0.0, incarnation=7) == 7
    assert lc.heartbeat(1.0, 7)


events = st.lists(
    st.tuples(
        st.sampled_from(["heartbeat", "exit", "drain", "drained", "check", "stop", "stale_hb", "stale_exit"]),
        st.floats(0.0, 50.0),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_random_events_keep_the_invariants(evs):
    lc = started()
    now = 0.0
    for kind, dt in evs:
        now += dt
        before = (lc.state, lc.incarnation)
        inc = lc.incarnation
        actions = []
        if kind == "heartbeat":
            lc.heartbeat(now, inc)
        elif kind == "exit":
            lc.exited(now, inc, "exit")
        elif kind == "drain":
            actions = lc.drain(now)
        elif kind == "drained":
            actions = lc.drained(now)
        elif kind == "stop":
            actions = lc.stop_all(now)
        elif kind == "check":
            actions = lc.check(now)
        elif kind == "stale_hb":
            assert not lc.heartbeat(now, inc - 1)
            assert (lc.state, lc.incarnation) == before
        elif kind == "stale_exit":
            assert not lc.exited(now, inc - 1, "old")
            assert (lc.state, lc.incarnation) == before
        for a in actions:
            if a.kind is ActionKind.SPAWN:
                assert lc.state is TEState.DEAD and not lc.stopping and a.incarnation == inc + 1
                lc.spawn(now)
            else:
                assert a.incarnation == lc.incarnation
        assert lc.incarnation >= before[1]
        if lc.state is TEState.STOPPED:
            assert lc.check(now + 1e6) == []  # gone for good: nothing to kill, nothing to restart
        if lc.stopping:
            assert all(a.kind is not ActionKind.SPAWN for a in lc.check(now + 1e6))
