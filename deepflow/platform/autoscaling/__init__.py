"""Autoscaling (paper §6): the pure autoscaler policy the cluster manager runs per TE group."""

from deepflow.platform.autoscaling.policy import (
    Autoscaler,
    GroupAutoscaler,
    GroupSample,
    ScaleDecision,
    ScaleReason,
    ScalingConfig,
)
from deepflow.platform.autoscaling.preload_policy import ModelCandidate, choose_preload
from deepflow.platform.autoscaling.windows import WindowedAverage

__all__ = [
    "Autoscaler",
    "GroupAutoscaler",
    "GroupSample",
    "ModelCandidate",
    "ScaleDecision",
    "ScaleReason",
    "ScalingConfig",
    "WindowedAverage",
    "choose_preload",
]
