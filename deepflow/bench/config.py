"""`BenchConfig`: everything that defines a `deepflow bench serve` run (light: the CLI imports it eagerly)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DATASETS", "ENDPOINTS", "BenchConfig"]

DATASETS = ("random", "shared-prefix", "multi-turn")
ENDPOINTS = ("completions", "chat")
_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class BenchConfig:
    """One benchmark run. Load shape: closed loop of `concurrency` workers, or Poisson arrivals at `rps`.

    With `rps`, `concurrency` (if set) caps the requests in flight. Multi-turn counts `num_prompts`
    conversations of `num_turns` requests each, and `rps` starts conversations.
    """

    base_url: str
    model: str
    dataset: str = "random"
    input_len: int = 256
    output_len: int = 128
    num_prompts: int = 100
    concurrency: int | None = None
    rps: float | None = None
    seed: int = 0
    endpoint: str | None = None  # None: chat for multi-turn, else completions
    prefix_len: int = 1024  # shared-prefix: the shared prefix; multi-turn: the shared system prompt
    num_turns: int = 4
    tokenizer: str | None = None  # HF folder; None: the server's /tokenize, else the embedded model
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    warmup: int = 0
    timeout: float = 300.0  # seconds per request, whole stream included
    label: str | None = None
    progress: bool = False

    def validate(self) -> None:
        """Raise ValueError on a config that cannot run (the CLI prints the message)."""
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        if self.endpoint is not None and self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, not {self.endpoint!r}")
        if self.dataset == "multi-turn" and self.endpoint == "completions":
            raise ValueError("multi-turn conversations need --endpoint chat")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, not {self.base_url!r}")
        positive = {
            "--input-len": self.input_len,
            "--output-len": self.output_len,
            "--num-prompts": self.num_prompts,
            "--num-turns": self.num_turns,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.prefix_len < 0 or self.warmup < 0:
            raise ValueError("--prefix-len and --warmup cannot be negative")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.rps is not None and not self.rps > 0:
            raise ValueError(f"--rps must be positive, got {self.rps}")
        if not self.timeout > 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout}")

    @property
    def root_url(self) -> str:
        """The server root: `--base-url` without a trailing `/` or `/v1` (both spellings are accepted)."""
        return self.base_url.rstrip("/").removesuffix("/v1")

    @property
    def resolved_endpoint(self) -> str:
        if self.endpoint is not None:
            return self.endpoint
        return "chat" if self.dataset == "multi-turn" else "completions"

    @property
    def path(self) -> str:
        return _PATHS[self.resolved_endpoint]

    @property
    def workers(self) -> int | None:
        """Requests (multi-turn: conversations) in flight at most; None: unbounded open loop."""
        if self.rps is None:
            return self.concurrency or 1
        return self.concurrency

    def describe_load(self) -> str:
        if self.rps is None:
            return f"closed loop, concurrency {self.workers}"
        cap = f", at most {self.concurrency} in flight" if self.concurrency else ""
        unit = "conversations" if self.dataset == "multi-turn" else "requests"
        return f"open loop, Poisson {self.rps:g} {unit}/s{cap}"

    def describe_workload(self) -> str:
        base = f"{self.num_prompts} prompts"
        if self.dataset == "shared-prefix":
            return f"shared-prefix: {base}, prefix {self.prefix_len} + suffix {self.input_len}"
        if self.dataset == "multi-turn":
            return (
                f"multi-turn: {self.num_prompts} conversations x {self.num_turns} turns, "
                f"system {self.prefix_len} + {self.input_len} per user message"
            )
        return f"random: {base}, input {self.input_len}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the API key left out, derived settings included."""
        data = asdict(self)
        data["api_key"] = "***" if self.api_key else None
        data["endpoint"] = self.resolved_endpoint
        return data
