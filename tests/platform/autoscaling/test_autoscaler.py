"""The autoscaler on a fake clock with synthetic metrics: every rule of deepflow/platform/autoscaling."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.platform.autoscaling import (
    Autoscaler,
    GroupAutoscaler,
    GroupSample,
    ScaleReason,
    ScalingConfig,
    WindowedAverage,
)

TARGET = 1000


def config(**kw) -> ScalingConfig:
    base = dict(
        min_tes=1,
        max_tes=8,
        target_outstanding_tokens=TARGET,
        stable_window_s=60.0,
        panic_window_s=6.0,
        scale_down_cooldown_s=30.0,
        scale_to_zero_after_s=120.0,
    )
    base.update(kw)
    return ScalingConfig(**base)


class Group:
    """A simulated group: applies every decision (new TEs start, then become ready after `start_s`)."""

    def __init__(self, cfg: ScalingConfig, ready: int = 1, start_s: float = 3.0) -> None:
        self.scaler = GroupAutoscaler(cfg)
        self.ready = ready
        self.starting: list[float] = []  # ready-at times
        self.start_s = start_s
        self.now = 0.0
        self.decisions = []

    def tick(self, load: float, *, held: int = 0, kv: float = 0.0, slo: float | None = None, dt: float = 1.0):
        self.now += dt
        self.ready += sum(1 for t in self.starting if t <= self.now)
        self.starting = [t for t in self.starting if t > self.now]
        tokens = int(load * TARGET) if self.ready else 0
        sample = GroupSample(
            ready=self.ready,
            starting=len(self.starting),
            outstanding_tokens=tokens,
            kv_usage=kv,
            held_requests=held,
            slo_violation_rate=slo,
        )
        self.last_sample = sample
        self.scaler.observe(self.now, sample)
        d = self.scaler.decide(self.now)
        self.decisions.append(d)
        if d.delta > 0:
            self.starting += [self.now + self.start_s] * d.delta
        elif d.delta < 0:  # surplus: starting ones first, then ready ones drain (at once, here)
            drop = -d.delta
            cut = min(drop, len(self.starting))
            self.starting = self.starting[cut:]
            self.ready -= drop - cut
        return d

    @property
    def total(self) -> int:
        return self.ready + len(self.starting)


def test_windowed_average_weights_by_time_and_forgets_old_samples():
    w = WindowedAverage(10.0)
    assert w.mean(0.0) is None
    w.add(0.0, 10.0)
    assert w.mean(0.0) == 10.0
    w.add(8.0, 0.0)  # 10 held for 8 s, 0 for 2 s
    assert w.mean(10.0) == pytest.approx(8.0)
    assert w.mean(18.0) == pytest.approx(0.0)  # the 10 fell out of the window
    assert w.max(18.0) == 0.0
    with pytest.raises(ValueError):
        w.add(5.0, 1.0)


def test_steady_load_keeps_the_group():
    g = Group(config())
    for _ in range(200):
        d = g.tick(0.8)
    assert g.total == 1 and d.reason == ScaleReason.STEADY


def test_burst_scales_up_and_waits_for_starting_tes():
    g = Group(config(), start_s=5.0)
    for _ in range(30):
        g.tick(0.5)
    first = g.tick(4.0)  # the panic window jumps: ceil(4000·(1/6)+...) — a scale-up at once or soon
    ups = [first]
    for _ in range(4):
        ups.append(g.tick(4.0))
    grew = [d for d in ups if d.delta > 0]
    assert grew and grew[0].reason in (ScaleReason.PANIC_UP, ScaleReason.LOAD_UP)
    # While those TEs start, no further scale-up is issued, however high the load.
    pending = [d for d in ups if d.reason == ScaleReason.PENDING_START]
    assert pending and all(d.delta == 0 for d in pending)
    for _ in range(60):
        g.tick(4.0)
    assert g.total == 4 and not g.starting


def test_panic_mode_never_scales_down_until_a_stable_window_passes():
    g = Group(config(max_tes=8), start_s=1.0)
    g.tick(0.5)
    for _ in range(10):
        g.tick(6.0)
    assert g.scaler.decisions[-1].panic
    assert g.total >= 3
    peak = g.total
    # The burst ends: in panic mode nothing is released.
    held = [g.tick(0.2) for _ in range(40)]
    assert all(d.delta == 0 for d in held)
    assert any(d.reason == ScaleReason.PANIC_HOLD for d in held)
    assert g.total == peak
    # After the stable window (and the cooldown), the group shrinks, at most halving per decision.
    for _ in range(200):
        d = g.tick(0.2)
        if d.delta < 0:
            assert d.desired >= -(-d.current // 2)
    assert g.total == 1


def test_scale_down_waits_for_the_cooldown():
    g = Group(config(), ready=1, start_s=1.0)
    for _ in range(70):
        g.tick(3.0)
    assert g.total == 3
    t_last_up = max(d.at for d in g.decisions if d.delta > 0)
    downs = []
    for _ in range(300):
        d = g.tick(0.5)
        if d.delta < 0:
            downs.append(d)
    assert downs and downs[0].reason == ScaleReason.LOAD_DOWN
    assert downs[0].at - t_last_up >= 30.0
    for a, b in itertools.pairwise(downs):
        assert b.at - a.at >= 30.0
    assert g.total == 1


def test_min_and_max_bound_the_group():
    g = Group(config(min_tes=2, max_tes=3), ready=2, start_s=1.0)
    for _ in range(100):
        g.tick(50.0)
    assert g.total == 3
    assert any(d.reason == ScaleReason.MAX_TES for d in g.decisions)
    for _ in range(400):
        g.tick(0.0)
    assert g.total == 2


def test_scale_to_zero_after_idle_and_back_from_zero_on_a_held_request():
    g = Group(config(min_tes=0), ready=1, start_s=2.0)
    for _ in range(60):
        g.tick(0.3)
    assert g.total == 1
    zeros = []
    for _ in range(200):
        d = g.tick(0.0)
        if d.reason == ScaleReason.TO_ZERO:
            zeros.append(d)
    assert g.total == 0 and len(zeros) == 1
    # Idle for scale_to_zero_after_s since the last busy sample, not earlier.
    last_busy = 60.0
    assert zeros[0].at - last_busy >= 120.0
    # A request arrives for the empty group: the JE holds it and the group comes back at once.
    d = g.tick(0.0, held=1)
    assert d.reason == ScaleReason.FROM_ZERO and d.desired == 1
    d = g.tick(0.0, held=1)
    assert d.delta == 0  # not a second TE for the same request
    for _ in range(3):
        g.tick(0.5)
    assert g.ready == 1


def test_min_zero_without_held_requests_stays_at_zero():
    g = Group(config(min_tes=0), ready=0)
    for _ in range(10):
        d = g.tick(0.0)
        assert d.desired == 0 and d.delta == 0


def test_slo_violations_and_kv_pressure_ask_for_one_more():
    g = Group(config(), ready=1, start_s=1.0)
    for _ in range(5):
        d = g.tick(0.2, slo=0.5)
    assert any(x.reason == ScaleReason.SLO_UP and x.delta == 1 for x in g.decisions)
    h = Group(config(), ready=1, start_s=1.0)
    for _ in range(5):
        d = h.tick(0.2, kv=0.97)
    assert any(x.reason == ScaleReason.KV_UP for x in h.decisions)
    assert d.desired <= 8


def test_groups_scale_independently():
    scaler = Autoscaler({("m", "prefill"): config(), ("m", "decode"): config()})
    for t in range(1, 30):
        scaler.observe(float(t), ("m", "prefill"), GroupSample(ready=1, outstanding_tokens=5 * TARGET))
        scaler.observe(float(t), ("m", "decode"), GroupSample(ready=1, outstanding_tokens=TARGET // 2))
        scaler.observe(float(t), ("other", "colocated"), GroupSample(ready=1))  # not autoscaled: ignored
    decisions = scaler.decide(30.0)
    assert decisions[("m", "prefill")].delta > 0
    assert decisions[("m", "decode")].delta == 0
    assert set(decisions) == {("m", "prefill"), ("m", "decode")}
    report = scaler.report()
    assert report["m/prefill"]["last"]["reason"] in ("panic_up", "load_up")


def test_config_is_validated():
    for bad in (dict(min_tes=3, max_tes=2), dict(panic_window_s=90.0), dict(panic_threshold=1.0)):
        with pytest.raises(ValueError):
            config(**bad)


@settings(max_examples=200, deadline=None)
@given(
    min_tes=st.integers(0, 3),
    extra=st.integers(0, 5),
    start_s=st.floats(0.5, 20.0),
    ticks=st.lists(
        st.tuples(
            st.floats(0.0, 30.0),  # load in TEs' worth
            st.integers(0, 3),  # held requests
            st.floats(0.0, 1.0),  # kv usage
            st.one_of(st.none(), st.floats(0.0, 1.0)),  # SLO violation rate
            st.floats(0.1, 20.0),  # dt
        ),
        min_size=1,
        max_size=120,
    ),
)
def test_decisions_respect_every_bound(min_tes, extra, start_s, ticks):
    cfg = config(min_tes=min_tes, max_tes=max(1, min_tes) + extra)
    g = Group(cfg, ready=max(1, min_tes), start_s=start_s)
    last_change = None
    for load, held, kv, slo, dt in ticks:
        d = g.tick(load, held=held if g.ready == 0 else 0, kv=kv, slo=slo, dt=dt)
        assert 0 <= d.desired <= cfg.max_tes
        assert d.desired >= cfg.min_tes
        if d.delta > 0:
            assert g.last_sample.starting == 0  # never a scale-up while TEs are still starting
        if d.delta < 0:
            assert not d.panic
            assert last_change is None or d.at - last_change >= cfg.scale_down_cooldown_s
        if d.delta != 0:
            last_change = d.at
        assert g.total == d.desired
