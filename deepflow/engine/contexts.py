"""Explicit context caching by ID (paper §4.3, DeepFlow's context caching endpoint): the types the front end
and the engine share. A context is a prompt whose KV blocks the engine's Relational Tensor Cache keeps pinned
until its TTL runs out or it is deleted; later requests name it with `context_id` and skip its prefill.
"""

from __future__ import annotations

import msgspec


class ContextLimitError(ValueError):
    """Pinning this context would exceed the engine's cap on pinned context tokens (HTTP 429)."""


class ContextInfo(msgspec.Struct, kw_only=True):
    context_id: str
    num_tokens: int  # tokens of the context's prompt
    num_pinned_tokens: int  # of those, tokens whose KV stays pinned (whole blocks)
    expires_at: float  # unix time (seconds)


class CreateContext(msgspec.Struct, kw_only=True):
    """Carried by the request that computes a context: pin its prompt's blocks as `context_id` when done."""

    context_id: str
    ttl_seconds: float
