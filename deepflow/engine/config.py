"""Engine configuration: one typed place for every knob of a FlowServe engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Names of torch dtypes, resolved when asked: the config stays importable without torch (the simulator).
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}


@dataclass
class EngineConfig:
    model: str | None = None  # an HF folder; None: the embedded SmolLM2
    dtype: str = "bfloat16"  # bf16 is the speed default on CPU; float32 for exact comparisons
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped by the KV pool
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the KV pool
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests use it to force preemption)
    enable_chunked_prefill: bool = True
    async_scheduling: bool = True
    # With async scheduling, a step of more tokens than this (a prefill) is collected before the next one is
    # planned: requests that arrive while it runs then join the very next step instead of the one after it,
    # for ~1-2 ms of unhidden planning per long step. None (the default): always overlap. Measured against
    # vLLM's client load at 128 (docs/benchmarks.md): TTFT p50 15-28% lower at concurrency 16 but 24-35%
    # higher at 32, where the long steps themselves ran slower; so it stays opt-in.
    async_max_step_tokens: int | None = None
    num_threads: int | None = None  # torch intra-op threads; None: torch's default (all cores)
    # Pin the model thread's OpenMP team, thread i to CPU cpu_ids[i] (vLLM's best CPU setting), with the
    # kernels' init_cpu_threads. None: the first num_threads CPUs this process may run on. The cluster
    # manager gives each TE its own CPUs.
    pin_threads: bool = True
    cpu_ids: list[int] | None = None
    enable_prefix_caching: bool = True  # implicit radix prefix cache; explicit contexts work either way
    host_cache_memory: int = 1 << 30  # bytes for the host tier of evicted KV blocks; 0: evictions drop
    num_host_blocks: int | None = None  # overrides host_cache_memory (tests)
    max_context_tokens: int | None = None  # cap on pinned context tokens; None: half the KV pool
    kv_events: bool = False  # publish cache-residency events with each step's outputs (for job executors)
    device: str = "cpu"  # where weights, KV and every step live: "cpu", "cuda", "cuda:1" (torch attention)
    # The compute path: "kernels" (FlowServe's C++ ops: paged attention, fused norm/rope/SiLU, small-batch
    # GEMV; CPU with AVX512-BF16), "torch" (plain torch ops, any device), "auto" (kernels where they run).
    backend: str = "auto"
    # Prefill/decode disaggregation (engine/kv_transfer.py): the KV pool lives in named shared memory
    # (`flow.allocate_kv_pool`) and a DistFlow `TransferAgent` serves it, so this engine can be the prefill
    # or the decode side of any request (it stays colocated for the others). CPU only.
    kv_transfer: bool = False
    kv_agent_name: str | None = None  # the agent's (unique) name; None: "engine-<pid>-<random>". A TE: its id
    kv_agent_host: str = "127.0.0.1"  # where the agent listens
    kv_agent_port: int = 0  # 0: a free port
    kv_agent_advertise: str | None = None  # the host peers connect to, when listening on 0.0.0.0
    # How this engine's writes reach a decode TE: "auto" (shared memory on one host, else TCP), "tcp", "shm".
    kv_backend: str = "auto"
    # How long a decode request that ended before all its KV arrived keeps its blocks (the prefill side may
    # still be writing into them): past any transfer deadline and prefill lease (both 30 s by default).
    kv_quarantine_s: float = 60.0

    def torch_dtype(self) -> torch.dtype:
        try:
            name = DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}") from None
        import torch

        return getattr(torch, name)

    def model_path(self) -> Path:
        if self.model is not None:
            path = Path(self.model).expanduser()
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"{path} is not a model folder (no config.json); give a local HF folder"
                )
            return path
        from deepflow.weights.embedded import prepare_embedded_model

        return prepare_embedded_model()
