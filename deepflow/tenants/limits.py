"""Per-tenant admission: requests/min, tokens/min and concurrency. Pure: the caller passes the time.

Each rate is a token bucket refilled continuously (capacity = one minute's allowance, so a burst of a
minute's worth is admitted, then the steady rate), which is what OpenAI's limits behave like. A refusal says
which limit and when a retry can succeed (`retry_after_s`, for the `retry-after` header); a refused request
charges nothing. Concurrency is a count released by `release` — the caller releases on its one exit path.

A request larger than a whole minute's token allowance can never pass: it is refused as such (a 400 is
the caller's choice), not made to wait forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from deepflow.tenants.model import TenantLimits

__all__ = ["Admission", "LimitKind", "TenantLimiter"]


class LimitKind(StrEnum):
    REQUESTS = "requests"  # requests per minute
    TOKENS = "tokens"  # tokens per minute
    CONCURRENCY = "concurrency"  # requests in flight
    TOO_LARGE = "too_large"  # more tokens than a minute's allowance


@dataclass(frozen=True)
class Admission:
    admitted: bool
    limit: LimitKind | None = None
    retry_after_s: float = 0.0
    detail: str = ""


class _Bucket:
    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.at = now

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def wait_for(self, amount: float) -> float:
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate


class TenantLimiter:
    """One tenant's limits. Not thread-safe: one per tenant per JE event loop."""

    def __init__(self, limits: TenantLimits, now: float) -> None:
        self.limits = limits
        self._requests = _Bucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self._tokens = _Bucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None
        self.in_flight = 0

    def try_admit(self, now: float, tokens: int) -> Admission:
        """Admit one request costing `tokens` (prompt + max output), or say why not and for how long."""
        lim = self.limits
        if self._tokens is not None and tokens > self._tokens.capacity:
            return Admission(
                False,
                LimitKind.TOO_LARGE,
                detail=f"the request needs {tokens} tokens; the limit is {lim.tokens_per_minute} per minute",
            )
        if lim.max_concurrent_requests is not None and self.in_flight >= lim.max_concurrent_requests:
            return Admission(
                False,
                LimitKind.CONCURRENCY,
                retry_after_s=1.0,  # unknown: whenever one of the running requests ends
                detail=f"{self.in_flight} requests in flight; the limit is {lim.max_concurrent_requests}",
            )
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        if self._requests is not None and (wait := self._requests.wait_for(1.0)) > 0:
            return Admission(
                False,
                LimitKind.REQUESTS,
                retry_after_s=wait,
                detail=f"limit of {lim.requests_per_minute} requests per minute reached",
            )
        if self._tokens is not None and (wait := self._tokens.wait_for(tokens)) > 0:
            return Admission(
                False,
                LimitKind.TOKENS,
                retry_after_s=wait,
                detail=f"limit of {lim.tokens_per_minute} tokens per minute reached",
            )
        if self._requests is not None:
            self._requests.level -= 1.0
        if self._tokens is not None:
            self._tokens.level -= tokens
        self.in_flight += 1
        return Admission(True)

    def refund(self, tokens: int) -> None:
        """Give back tokens charged but not used (a request that ended early): a fairer next minute."""
        if self._tokens is not None and tokens > 0:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + tokens)

    def release(self) -> None:
        """An admitted request ended (however it ended)."""
        if self.in_flight <= 0:
            raise RuntimeError("release without a matching admission")
        self.in_flight -= 1

    @staticmethod
    def retry_after_header(admission: Admission) -> str:
        """Whole seconds, rounded up, at least 1 (the `retry-after` header)."""
        return str(max(1, math.ceil(admission.retry_after_s)))
