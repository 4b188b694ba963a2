"""Decode-length predictors (paper §5.3.2): how many tokens a request will generate, guessed when it arrives.

The PD-aware router looks the request up in the heatmap by (prompt length, predicted decode length), so the
prediction decides the mode. Three predictors share one interface (`DecodeLengthPredictor`):

- `OracleLength`: the real length (`RoutingRequest.true_output_tokens`, known to a simulation or a study;
  an `ignore_eos` request's budget is its real length too) — the upper bound of the paper's study.
- `NoisyOracle`: the real length with probability `accuracy`, else a wrong one — the paper's "90% accurate"
  predictor, for the accuracy study.
- `LearnedLength`: learned online from finished requests, bucketed by request features, bounded memory.

**Accuracy**, as every predictor here is scored (`AccuracyMeter`): a prediction `p` of a real length `a`
is *accurate* when it is within a factor `1 + tolerance` of it, `max(p, a) <= (1 + tolerance) * min(p, a)`
(lengths below 1 count as 1). The default tolerance 0.5 is about the width of the heatmap's columns (the
decode/prefill ratios of Figure 5 step by 2x or more), so an accurate prediction usually lands in the right
cell. `NoisyOracle`'s wrong answers are off by a factor of at least `min_error_factor` (default 2 > 1.5),
so its measured accuracy converges to its configured one. The mean absolute error (tokens) is reported too.

`MeasuredPredictor` wraps a predictor: it remembers what was predicted for each routed request (bounded)
and scores it when the request finishes, so the reported accuracy is that of the predictions the router
acted on. Pure and deterministic: no clock, and the noisy oracle's noise is a function of (seed, request id).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from deepflow.platform.je.policies.types import RoutingRequest

__all__ = [
    "PREDICTORS",
    "AccuracyMeter",
    "DecodeLengthPredictor",
    "LearnedLength",
    "MeasuredPredictor",
    "NoisyOracle",
    "OracleLength",
    "is_accurate",
    "make_predictor",
]

DEFAULT_TOLERANCE = 0.5


class DecodeLengthPredictor(Protocol):
    name: str

    def predict(self, request: RoutingRequest) -> int:
        """Predicted output tokens of `request` (>= 1)."""
        ...

    def learn(self, request: RoutingRequest, output_tokens: int) -> None:
        """`request` finished with `output_tokens` tokens (online predictors update; others ignore it)."""
        ...

    def report(self) -> dict[str, Any]:
        """JSON-able state (configuration, what it has learned)."""
        ...


def is_accurate(predicted: int, actual: int, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Whether `predicted` is within a factor `1 + tolerance` of `actual` (lengths below 1 count as 1)."""
    p, a = max(1, predicted), max(1, actual)
    return max(p, a) <= (1.0 + tolerance) * min(p, a)


def _truth(request: RoutingRequest) -> int | None:
    """The request's real output length where it is known: given, or an ignore_eos request's budget."""
    if request.true_output_tokens is not None:
        return max(0, request.true_output_tokens)
    if request.ignore_eos and request.expected_output_tokens is not None:
        return request.expected_output_tokens
    return None


# ------------------------------------------------------------------------------------------------ oracles


@dataclass
class OracleLength:
    """The real output length. Without one (production: no trace, no ignore_eos) it answers the budget
    (`max_tokens`), else `default_tokens`, and counts the request as `unknown` in its report."""

    name: ClassVar[str] = "oracle"

    default_tokens: int = 256
    _unknown: int = field(default=0, repr=False)

    def predict(self, request: RoutingRequest) -> int:
        truth = _truth(request)
        if truth is not None:
            return max(1, truth)
        self._unknown += 1
        return max(1, request.expected_output_tokens or self.default_tokens)

    def learn(self, request: RoutingRequest, output_tokens: int) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {"predictor": self.name, "unknown": self._unknown}


@dataclass
class NoisyOracle:
    """The real length with probability `accuracy`; otherwise the real length multiplied or divided by a
    factor drawn log-uniformly from [`min_error_factor`, `max_error_factor`] — never accurate by
    `is_accurate` when `min_error_factor > 1 + tolerance`. Where dividing would fall below 1 it multiplies.

    Deterministic per request: the draw is seeded by (`seed`, request id), so predicting a request twice
    (or replaying a trace) gives the same answer.
    """

    name: ClassVar[str] = "noisy_oracle"

    accuracy: float = 0.9
    seed: int = 0
    min_error_factor: float = 2.0
    max_error_factor: float = 8.0
    oracle: OracleLength = field(default_factory=OracleLength)

    def __post_init__(self) -> None:
        if not 0.0 <= self.accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {self.accuracy}")
        if not 1.0 < self.min_error_factor <= self.max_error_factor:
            raise ValueError("need 1 < min_error_factor <= max_error_factor")

    def predict(self, request: RoutingRequest) -> int:
        truth = self.oracle.predict(request)
        rng = random.Random(f"{self.seed}:{request.request_id}")
        if rng.random() < self.accuracy:
            return truth
        factor = math.exp(rng.uniform(math.log(self.min_error_factor), math.log(self.max_error_factor)))
        if rng.random() < 0.5 and truth / factor >= 1.0:
            # Rounding must not bring it back within the tolerance: floor, at most truth / min factor.
            return max(1, math.floor(truth / factor))
        return max(truth + 1, math.ceil(truth * factor))

    def learn(self, request: RoutingRequest, output_tokens: int) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {
            "predictor": self.name,
            "configured_accuracy": self.accuracy,
            "error_factor": [self.min_error_factor, self.max_error_factor],
            "unknown": self.oracle.report()["unknown"],
        }


# ------------------------------------------------------------------------------------------------ learned


def _log2_bucket(n: int | None) -> int:
    """0 for None/0, else 1 + floor(log2 n): lengths within a factor 2 share a bucket."""
    return 0 if not n or n < 1 else n.bit_length()


@dataclass
class _Stat:
    """Running estimate of one bucket: the mean of log(1 + tokens), a geometric mean robust to the long
    tail of output lengths, exponentially weighted once `count` exceeds 1/alpha (so it follows drift)."""

    count: int = 0
    mean_log: float = 0.0

    def add(self, tokens: int, alpha: float) -> None:
        self.count += 1
        weight = max(1.0 / self.count, alpha)
        self.mean_log += weight * (math.log1p(tokens) - self.mean_log)

    @property
    def estimate(self) -> int:
        return max(1, round(math.expm1(self.mean_log)))


@dataclass
class LearnedLength:
    """Output length learned online from finished requests: a back-off over feature buckets.

    Features a request carries at arrival: its namespace (`cache_salt`: a tenant or an application), a hash
    of its first `prefix_tokens` prompt tokens (the system prompt: the same instructions tend to give
    answers of similar length), its prompt length (log2 bucket) and its budget `max_tokens` (log2 bucket).
    Levels, most specific first:

        (namespace, system prefix, prompt bucket, budget bucket), (namespace, system prefix),
        (namespace, prompt bucket, budget bucket), (prompt bucket, budget bucket), (budget bucket), ()

    A prediction comes from the first level whose bucket has at least `min_samples` finished requests
    (else `default_tokens`), and is capped by the budget. An `ignore_eos` request generates exactly its
    budget: that is answered as is, and not learned from (it says nothing about natural lengths).

    Memory is bounded: each level keeps at most `max_buckets` buckets, the least recently updated evicted
    first.
    """

    name: ClassVar[str] = "learned"
    LEVELS: ClassVar[tuple[str, ...]] = ("full", "prefix", "lengths", "shape", "budget", "global")

    prefix_tokens: int = 64
    min_samples: int = 3
    alpha: float = 0.05
    max_buckets: int = 4096
    default_tokens: int = 256
    _tables: dict[str, OrderedDict[tuple[Any, ...], _Stat]] = field(default_factory=dict, repr=False)
    _answered_by: dict[str, int] = field(default_factory=dict, repr=False)
    _learned: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.min_samples < 1 or self.max_buckets < 1 or self.prefix_tokens < 1:
            raise ValueError("min_samples, max_buckets and prefix_tokens must be >= 1")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        self._tables = {level: OrderedDict() for level in self.LEVELS}

    def _keys(self, request: RoutingRequest) -> list[tuple[str, tuple[Any, ...]]]:
        tokens = request.prompt_token_ids
        plen, budget = _log2_bucket(len(tokens)), _log2_bucket(request.expected_output_tokens)
        ns = request.cache_salt
        # Only a prompt longer than the prefix has a system prefix to share; ints hash deterministically.
        prefix = hash(tuple(tokens[: self.prefix_tokens])) if len(tokens) > self.prefix_tokens else None
        keys: list[tuple[str, tuple[Any, ...]]] = []
        if prefix is not None:
            keys += [("full", (ns, prefix, plen, budget)), ("prefix", (ns, prefix))]
        keys += [("lengths", (ns, plen, budget)), ("shape", (plen, budget)), ("budget", (budget,))]
        keys.append(("global", ()))
        return keys

    def predict(self, request: RoutingRequest) -> int:
        budget = request.expected_output_tokens
        if request.ignore_eos and budget is not None:
            self._count("ignore_eos")
            return max(1, budget)
        guess, source = self.default_tokens, "default"
        for level, key in self._keys(request):
            stat = self._tables[level].get(key)
            if stat is not None and stat.count >= self.min_samples:
                guess, source = stat.estimate, level
                break
        self._count(source)
        return max(1, min(guess, budget) if budget else guess)

    def learn(self, request: RoutingRequest, output_tokens: int) -> None:
        if request.ignore_eos:
            return
        self._learned += 1
        tokens = max(0, output_tokens)
        for level, key in self._keys(request):
            table = self._tables[level]
            stat = table.get(key)
            if stat is None:
                stat = table[key] = _Stat()
                if len(table) > self.max_buckets:
                    table.popitem(last=False)
            else:
                table.move_to_end(key)
            stat.add(tokens, self.alpha)

    def _count(self, source: str) -> None:
        self._answered_by[source] = self._answered_by.get(source, 0) + 1

    def report(self) -> dict[str, Any]:
        return {
            "predictor": self.name,
            "learned_from": self._learned,
            "buckets": {level: len(table) for level, table in self._tables.items()},
            "answered_by": dict(sorted(self._answered_by.items())),
        }


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class AccuracyMeter:
    """Accuracy (`is_accurate`) and mean absolute error of scored predictions: over all of them, and over
    the last `window` (an operator watches the recent figure move when the workload changes)."""

    tolerance: float = DEFAULT_TOLERANCE
    window: int = 1000
    count: int = 0
    accurate: int = 0
    abs_error_sum: int = 0
    _recent: deque[tuple[bool, int]] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if self.tolerance < 0 or self.window < 1:
            raise ValueError("tolerance must be >= 0 and window >= 1")
        self._recent = deque(maxlen=self.window)

    def add(self, predicted: int, actual: int) -> bool:
        ok = is_accurate(predicted, actual, self.tolerance)
        err = abs(predicted - actual)
        self.count += 1
        self.accurate += ok
        self.abs_error_sum += err
        self._recent.append((ok, err))
        return ok

    @property
    def accuracy(self) -> float | None:
        return self.accurate / self.count if self.count else None

    @property
    def mean_abs_error(self) -> float | None:
        return self.abs_error_sum / self.count if self.count else None

    def report(self) -> dict[str, Any]:
        recent = list(self._recent)
        return {
            "tolerance": self.tolerance,
            "scored": self.count,
            "accuracy": self.accuracy,
            "mean_abs_error": self.mean_abs_error,
            "recent": {
                "scored": len(recent),
                "accuracy": sum(ok for ok, _ in recent) / len(recent) if recent else None,
                "mean_abs_error": sum(e for _, e in recent) / len(recent) if recent else None,
            },
        }


@dataclass
class MeasuredPredictor:
    """A predictor whose predictions are scored when their requests finish.

    `predict` remembers the answer per request id (at most `max_pending`, the oldest forgotten first: a
    request that never reports back cannot grow it); `observe` scores the remembered answer, or, for a
    request it did not predict (forgotten, or routed before a restart), what it would predict now, before
    learning from it — then lets the predictor learn.
    """

    predictor: DecodeLengthPredictor
    meter: AccuracyMeter = field(default_factory=AccuracyMeter)
    max_pending: int = 65536
    _pending: OrderedDict[str, int] = field(default_factory=OrderedDict, repr=False)

    @property
    def name(self) -> str:
        return self.predictor.name

    def predict(self, request: RoutingRequest) -> int:
        predicted = max(1, self.predictor.predict(request))
        self._pending[request.request_id] = predicted
        self._pending.move_to_end(request.request_id)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
        return predicted

    def observe(self, request: RoutingRequest, output_tokens: int) -> None:
        predicted = self._pending.pop(request.request_id, None)
        if predicted is None:
            predicted = max(1, self.predictor.predict(request))
        self.meter.add(predicted, output_tokens)
        self.predictor.learn(request, output_tokens)

    def report(self) -> dict[str, Any]:
        return {**self.predictor.report(), **self.meter.report(), "pending": len(self._pending)}


PREDICTORS: dict[str, Callable[..., DecodeLengthPredictor]] = {
    OracleLength.name: OracleLength,
    NoisyOracle.name: NoisyOracle,
    LearnedLength.name: LearnedLength,
}


def make_predictor(name: str, **params: Any) -> DecodeLengthPredictor:
    """A new predictor `name` ("oracle", "noisy_oracle", "learned") with its `params`."""
    try:
        factory = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}") from None
    return factory(**params)
