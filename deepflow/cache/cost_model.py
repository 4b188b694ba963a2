"""Populate or recompute? A small online-fitted cost model (paper §4.3: the host tier pays off only when
copying a prefix's KV back is cheaper than running its prefill again).

Both costs are lines fitted to what the engine measures: a step's wall time against the tokens it computed
(the slope is the marginal prefill cost per token), and a populate's latency, from issue to the step that
reports it done, against its blocks (that latency includes waiting for the step, which is the real price a
request pays). Observations decay exponentially, so the fit follows the machine's current load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _DecayedLine:
    """Weighted least squares for y = a + b x with exponentially decaying weights; falls back to a prior."""

    prior_a: float
    prior_b: float
    decay: float = 0.98
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def observe(self, x: float, y: float) -> None:
        d = self.decay
        self.w = self.w * d + 1.0
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y

    def coefficients(self) -> tuple[float, float]:
        if self.w < 2.0:
            return self.prior_a, self.prior_b
        mean_x, mean_y = self.sx / self.w, self.sy / self.w
        var_x = self.sxx / self.w - mean_x * mean_x
        if var_x <= 1e-9 * max(mean_x * mean_x, 1.0):
            # All observations at one x: keep the prior's slope, fit the level through the mean.
            return max(mean_y - self.prior_b * mean_x, 0.0), self.prior_b
        b = (self.sxy / self.w - mean_x * mean_y) / var_x
        b = max(b, 0.0)
        return max(mean_y - b * mean_x, 0.0), b

    def predict(self, x: float) -> float:
        a, b = self.coefficients()
        return a + b * x


class PopulateCostModel:
    def __init__(
        self,
        prefill_seconds_per_token: float = 1e-3,
        step_overhead_seconds: float = 0.02,
        populate_seconds_per_block: float = 1e-4,
    ) -> None:
        self.step = _DecayedLine(prior_a=step_overhead_seconds, prior_b=prefill_seconds_per_token)
        # Before any populate was seen: one step of waiting plus a per-block copy cost.
        self.populate = _DecayedLine(prior_a=step_overhead_seconds, prior_b=populate_seconds_per_block)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0:
            self.step.observe(num_tokens, seconds)

    def observe_populate(self, num_blocks: int, seconds: float) -> None:
        self.populate.observe(num_blocks, seconds)

    def recompute_seconds(self, num_tokens: int) -> float:
        return self.step.coefficients()[1] * num_tokens

    def populate_seconds(self, num_blocks: int) -> float:
        return self.populate.predict(num_blocks)

    def should_populate(self, num_tokens: int, num_blocks: int) -> bool:
        return self.populate_seconds(num_blocks) < self.recompute_seconds(num_tokens)
