"""The cost model: features, the least-squares fit, profile files (fitted and hand-written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepflow.sim.costmodel import FEATURES, HardwareProfile, StepShape, fit_profile, load_profile


def test_step_shape_features() -> None:
    shape = StepShape()
    shape.add(start=99, num_new=1)  # a decode at context 100
    shape.add(start=0, num_new=10)  # a 10-token chunk from scratch
    assert shape.tokens == 11 and shape.sequences == 2
    assert shape.decode_context == pytest.approx(0.1)
    assert shape.prefill_attention == pytest.approx(10 * 5.5 / 1e3)


def test_fit_recovers_known_coefficients() -> None:
    truth = {
        "const": 0.01,
        "tokens": 3e-4,
        "prefill_attention": 2e-5,
        "decode_context": 1e-3,
        "sequences": 2e-4,
    }
    profile = HardwareProfile(truth)
    shapes = []
    for batch in (1, 4, 16, 64):
        for context in (32, 512, 2048):
            decode = StepShape()
            for _ in range(batch):
                decode.add(context, 1)
            shapes.append(decode)
    for n in (16, 256, 2048):
        for start in (0, 1024):
            chunk = StepShape()
            chunk.add(start, n)
            shapes.append(chunk)
    seconds = [profile.step_seconds(s) for s in shapes]
    fitted = fit_profile(shapes, seconds)
    assert fitted.kind == "fitted"
    for name in FEATURES:
        assert fitted.coefficients[name] == pytest.approx(truth[name], rel=1e-6, abs=1e-9)
    assert fitted.fit["r2"] == pytest.approx(1.0) and fitted.fit["mean_abs_pct_error"] < 1e-6


def test_fit_never_keeps_a_negative_coefficient() -> None:
    shapes = []
    for n in range(1, 20):
        s = StepShape()
        s.add(0, n * 10)
        shapes.append(s)
    seconds = [0.05 - 1e-5 * s.tokens + 1e-4 * s.prefill_attention for s in shapes]
    fitted = fit_profile(shapes, seconds)
    assert all(v >= 0 for k, v in fitted.coefficients.items() if k != "const")


def test_profile_round_trip_and_hand_written(tmp_path: Path) -> None:
    profile = HardwareProfile({"const": 0.02, "tokens": 1e-4}, description="by hand", min_step_seconds=0.001)
    path = profile.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["kind"] == "hand-written" and data["format"] == "deepflow-sim-profile/1"
    again = load_profile(path)
    assert again.coefficients["tokens"] == 1e-4 and again.coefficients["decode_context"] == 0.0
    assert again.step_seconds(StepShape()) == pytest.approx(0.02)
    assert again.step_seconds(StepShape(), copied_blocks=10) == pytest.approx(
        0.02 + 10 * again.copy_seconds_per_block
    )
    with pytest.raises(ValueError, match="unknown features"):
        HardwareProfile({"flops": 1.0})
    with pytest.raises(ValueError, match="kind"):
        HardwareProfile({"const": 1.0}, kind="guessed")


def test_the_shipped_default_is_a_fitted_profile() -> None:
    profile = load_profile()
    assert profile.kind == "fitted"
    assert profile.fit["r2"] > 0.5 and profile.fit["samples"] > 20  # measured on a shared, noisy machine
    decode = StepShape()
    for _ in range(32):
        decode.add(300, 1)
    assert 0.001 < profile.step_seconds(decode) < 5.0
