"""The HTTP edge's limits: what one request may cost before any of it is parsed or run.

A plain msgspec struct so that it travels inside the `ClusterSpec` to every job executor unchanged.
"""

from __future__ import annotations

import msgspec

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: ~1M tokens of text, far beyond any context we serve
DEFAULT_MAX_SEQUENCES = 256  # prompts x n of one request
MAX_JSON_DEPTH = 32  # our deepest body (messages[i].content[j].text) nests 5 levels
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Bodies (and texts) above this size are parsed (and tokenized) in a thread, so that one big request cannot
# stall the event loop that answers every other connection (/health included).
OFFLOAD_BYTES = 64 << 10


class APILimits(msgspec.Struct, kw_only=True, frozen=True):
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger bodies: 413, refused before they are parsed
    max_sequences: int = DEFAULT_MAX_SEQUENCES  # cap on prompts x n: 400 above
    metrics_public: bool = False  # /metrics without the API key (its prefix-cache counters are per-server)

    def validate(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {self.max_sequences}")
