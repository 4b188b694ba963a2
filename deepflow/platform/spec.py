"""What a `deepflow serve` cluster runs: models (each a TE group), TEs per model, policies, ports.

Built from the command line (`--model A --model B --tes 2`) or a YAML file (`--config cluster.yaml`) and
handed, as JSON, to the cluster manager and every job executor, so all processes agree on one spec.

```yaml
host: 127.0.0.1
port: 8000
job_executors: 2       # >= 2: a client's retry lands on a survivor while one restarts
models:
  - name: smol            # served model name (default: the folder's name)
    model: /path/to/hf    # omit for the embedded SmolLM2
    tes: 2
    policy: combined      # round_robin | least_load | locality | combined
    engine:               # any EngineConfig field; sizes take units
      dtype: bfloat16
      kv_cache_memory: 512MiB
```
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import msgspec

from deepflow.api.limits import APILimits
from deepflow.engine.config import EngineConfig
from deepflow.platform.je.policies import POLICIES

_SIZE_FIELDS = ("kv_cache_memory", "host_cache_memory")


class ModelSpec(msgspec.Struct, kw_only=True):
    name: str
    engine: EngineConfig
    tes: int = 1
    policy: str = "combined"


class ClusterSpec(msgspec.Struct, kw_only=True):
    models: list[ModelSpec]
    host: str = "127.0.0.1"
    port: int = 8000
    job_executors: int = 2  # a JE that dies fails only its own requests; a retry reaches another
    tokenizer_workers: int | None = None  # per model in each JE; None: sized to the machine (0 below 8 cores)
    shutdown_timeout: int = 10
    log_level: str = "info"
    api: APILimits = msgspec.field(default_factory=APILimits)  # the HTTP edge's limits, read by every JE

    def validate(self) -> None:
        if not self.models:
            raise ValueError("the cluster serves no model")
        names = [m.name for m in self.models]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"served model names must be unique, got {duplicated} more than once")
        for m in self.models:
            if m.tes < 1:
                raise ValueError(f"model {m.name}: tes must be >= 1, got {m.tes}")
            if m.policy not in POLICIES:
                raise ValueError(
                    f"model {m.name}: unknown policy {m.policy!r}; choose from {sorted(POLICIES)}"
                )
        if self.job_executors < 1:
            raise ValueError(f"job_executors must be >= 1, got {self.job_executors}")
        self.api.validate()

    @property
    def total_tes(self) -> int:
        return sum(m.tes for m in self.models)

    def te_ids(self) -> list[tuple[str, ModelSpec]]:
        """Every TE's id with its model: te-0, te-1, ... across the models in order."""
        models = [m for m in self.models for _ in range(m.tes)]
        return [(f"te-{i}", m) for i, m in enumerate(models)]

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str | bytes) -> ClusterSpec:
        return msgspec.json.decode(text, type=cls)


def served_name(engine: EngineConfig, name: str | None) -> str:
    return name or engine.model_path().name


def engine_threads(spec: ClusterSpec) -> int:
    """torch threads per TE: the machine's cores shared among the TEs (at least one each)."""
    return max(1, (os.cpu_count() or 1) // spec.total_tes)


def te_cpus(slot: int, threads: int, allowed: list[int]) -> list[int]:
    """The CPUs TE slot `slot` pins its `threads` OpenMP threads to: consecutive runs of `allowed`, so TEs
    in different slots share no core while there are cores enough (then they wrap around)."""
    if not allowed:
        return []
    return [allowed[(slot * threads + i) % len(allowed)] for i in range(threads)]


def load_config(path: str | os.PathLike[str], parse_size: Any) -> ClusterSpec:
    """A ClusterSpec from a YAML file; `parse_size` turns '512MiB' into bytes."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise ValueError(f"{path}: expected a mapping with a 'models' list")
    known_engine = {f.name for f in dataclasses.fields(EngineConfig)}
    models = []
    for i, entry in enumerate(raw.pop("models")):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: models[{i}] must be a mapping")
        entry = dict(entry)
        engine_kwargs = dict(entry.pop("engine", None) or {})
        if "model" in entry:
            engine_kwargs["model"] = entry.pop("model")
        unknown = sorted(set(engine_kwargs) - known_engine)
        if unknown:
            raise ValueError(f"{path}: models[{i}].engine has unknown settings {unknown}")
        for key in _SIZE_FIELDS:
            if isinstance(engine_kwargs.get(key), str):
                engine_kwargs[key] = parse_size(engine_kwargs[key])
        engine = EngineConfig(**engine_kwargs)
        extra = sorted(set(entry) - {"name", "tes", "policy"})
        if extra:
            raise ValueError(f"{path}: models[{i}] has unknown keys {extra}")
        models.append(
            ModelSpec(
                name=served_name(engine, entry.get("name")),
                engine=engine,
                tes=int(entry.get("tes", 1)),
                policy=str(entry.get("policy", "combined")),
            )
        )
    top = {"host", "port", "job_executors", "tokenizer_workers", "shutdown_timeout", "log_level", "api"}
    extra = sorted(set(raw) - top)
    if extra:
        raise ValueError(f"{path}: unknown keys {extra}")
    # api: {max_body_bytes: 4MiB, max_sequences: 256, metrics_public: false} (the HTTP edge's limits)
    api = dict(raw.pop("api", None) or {})
    unknown_api = sorted(set(api) - set(APILimits.__struct_fields__))
    if unknown_api:
        raise ValueError(f"{path}: api has unknown settings {unknown_api}")
    if isinstance(api.get("max_body_bytes"), str):
        api["max_body_bytes"] = parse_size(api["max_body_bytes"])
    try:
        raw["api"] = msgspec.convert(api, APILimits)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: api: {exc}") from None
    spec = ClusterSpec(models=models, **raw)
    spec.validate()
    return spec
