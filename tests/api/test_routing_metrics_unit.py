"""The job executor's routing in /metrics: requests per serving mode and reason, and the PD router's
decode-length predictor accuracy, read from each model's routing client report (no processes)."""

from __future__ import annotations

from typing import Any

from deepflow.api.metrics import HTTPMetrics
from tests.api.server_utils import metric_value


class Client:
    def __init__(self, report: dict[str, Any]) -> None:
        self._report = report

    def report(self) -> dict[str, Any]:
        return self._report


class Engine:
    def __init__(self, report: dict[str, Any] | None) -> None:
        if report is not None:
            self.client = Client(report)


def test_routing_families_per_model() -> None:
    pd = {
        "modes": {"disaggregated/heatmap": 3, "colocated/heatmap_load": 1},
        "router": {
            "router": "pd_aware",
            "predictor": {"scored": 4, "accuracy": 0.75, "recent": {"accuracy": 0.5}},
        },
    }
    fixed = {"modes": {"colocated/only_colocated": 2}, "router": {"router": "fixed", "prefer": "colocated"}}
    text = HTTPMetrics({"pd": Engine(pd), "plain": Engine(fixed), "fake": Engine(None)}).render().decode()
    decisions = "deepflow:routing_decisions_total"
    assert metric_value(text, decisions, model_name="pd", mode="disaggregated", reason="heatmap") == 3
    assert metric_value(text, decisions, model_name="pd", mode="colocated", reason="heatmap_load") == 1
    assert metric_value(text, decisions, model_name="plain", mode="colocated", reason="only_colocated") == 2
    accuracy = "deepflow:decode_length_predictor_accuracy"
    assert metric_value(text, accuracy, model_name="pd", window="all") == 0.75
    assert metric_value(text, accuracy, model_name="pd", window="recent") == 0.5
    assert metric_value(text, accuracy, model_name="plain") is None  # a fixed router predicts nothing
    assert metric_value(text, "deepflow:decode_length_predictions_scored_total", model_name="pd") == 4
    assert text.count(f"# TYPE {decisions} counter") == 1
