"""Populate or recompute? A small online-fitted cost model (paper §4.3: the host tier pays off only when
copying a prefix's KV back is cheaper than running its prefill again).

Both costs come from what the engine measures every step: a step's wall time against the tokens it computed
(the slope is the marginal prefill cost per token) and the time of the block copies it made. Observations
decay exponentially, so the fit follows the machine's current load.
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
    """populate(blocks) = copy time (a line fitted to every measured block copy, evictions included) + one
    engine step of waiting (the runner reports a populate done with the step that carried it; the step time
    is an EWMA of every step). recompute(tokens) = the fitted marginal prefill cost per token.

    Every term is observed continuously, whatever the decisions: a model fitted only on the populates it
    chose to run could talk itself out of populating for good after a few slow ones."""

    def __init__(
        self,
        prefill_seconds_per_token: float = 1e-3,
        step_seconds: float = 0.02,
        copy_seconds_per_block: float = 1e-4,
        step_decay: float = 0.9,
    ) -> None:
        self.step = _DecayedLine(prior_a=step_seconds, prior_b=prefill_seconds_per_token)
        self.copy = _DecayedLine(prior_a=0.0, prior_b=copy_seconds_per_block)
        self.step_seconds = step_seconds  # EWMA of a whole step's wall time
        self._step_decay = step_decay

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.step_seconds = self._step_decay * self.step_seconds + (1 - self._step_decay) * seconds
        if num_tokens > 0:
            self.step.observe(num_tokens, seconds)

    def observe_copy(self, num_blocks: int, seconds: float) -> None:
        if num_blocks > 0:
            self.copy.observe(num_blocks, seconds)

    def recompute_seconds(self, num_tokens: int) -> float:
        return self.step.coefficients()[1] * num_tokens

    def populate_seconds(self, num_blocks: int) -> float:
        return self.copy.predict(num_blocks) + self.step_seconds

    def should_populate(self, num_tokens: int, num_blocks: int) -> bool:
        return self.populate_seconds(num_blocks) < self.recompute_seconds(num_tokens)
