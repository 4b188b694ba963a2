"""The scaling timeline record: steps, totals, the report, a round trip through msgpack."""

from __future__ import annotations

import msgspec
import pytest

from deepflow.platform.autoscaling.timeline import LoadSource, ScalingStep, StartTimeline


def test_steps_total_report_and_wire_round_trip():
    t = StartTimeline(te_id="te-0", incarnation=2, load_source=LoadSource.DRAM_HIT)
    stamps = [10.0, 10.1, 10.6, 10.9, 11.0, 11.2]
    for step, a, b in zip(ScalingStep, stamps, stamps[1:], strict=False):
        assert not t.complete
        t.record(step, a, b)
    assert t.complete
    assert t.seconds(ScalingStep.TE_LOAD) == pytest.approx(0.3)
    assert t.total_seconds() == pytest.approx(1.2)
    report = t.report()
    assert report["load_source"] == "dram_hit"
    assert list(report["steps_s"]) == [s.value for s in ScalingStep]
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=StartTimeline)
    assert back == t


def test_partial_timelines_and_bad_spans():
    t = StartTimeline(te_id="te-1", incarnation=0)
    t.record(ScalingStep.TE_PRE_LOAD, 1.0, 2.0)
    assert t.total_seconds() is None and t.seconds(ScalingStep.TE_LOAD) is None
    assert t.report()["steps_s"] == {"te_pre_load": 1.0}
    with pytest.raises(ValueError):
        t.record(ScalingStep.TE_LOAD, 3.0, 2.0)
