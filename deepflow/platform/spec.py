"""What a `deepflow serve` cluster runs: models, each served by up to three TE groups (colocated, prefill,
decode), TEs per group, policies, the router between the groups, ports.

Built from the command line (`--model A --model B --tes 2 --pd 1:1`) or a YAML file (`--config
cluster.yaml`) and handed, as JSON, to the cluster manager and every job executor, so all processes agree on
one spec.

```yaml
host: 127.0.0.1
port: 8000
job_executors: 2       # >= 2: a client's retry lands on a survivor while one restarts
models:
  - name: smol            # served model name (default: the folder's name)
    model: /path/to/hf    # omit for the embedded SmolLM2
    tes: 2                # colocated TEs (shorthand for a `colocated` group; 0 with only P/D groups)
    groups:               # or every group explicitly: role colocated | prefill | decode, TE count
      - {role: prefill, tes: 1}
      - {role: decode, tes: 1}
    policy: combined      # round_robin | least_load | locality | combined (picks the TE within a group)
    router: fixed         # how a request is split across the groups (policies/routers.py: ROUTERS)
    router_params: {prefer: alternate}
    kv_transfer: {mode: by_request, timeout_s: 30, lease_s: 30}   # the P/D requests' KV hand-over
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
from deepflow.engine.kv_transfer import KVMode
from deepflow.platform.je.policies import POLICIES, make_policy
from deepflow.platform.je.policies.router import TERole
from deepflow.platform.je.policies.routers import ROUTERS, make_router

_SIZE_FIELDS = ("kv_cache_memory", "host_cache_memory")

# TE ids by role: te-0, te-1 (colocated), te-p0 (prefill), te-d0 (decode); numbered across models.
TE_ID_PREFIX = {TERole.COLOCATED: "te-", TERole.PREFILL: "te-p", TERole.DECODE: "te-d"}


class KVTransferSpec(msgspec.Struct, kw_only=True, frozen=True):
    """How a model's disaggregated requests hand their KV over (engine/kv_transfer.py)."""

    mode: KVMode = KVMode.BY_REQUEST
    timeout_s: float = 30.0  # the decode side's bound on waiting for the KV and the first token
    lease_s: float = 30.0  # the longest the prefill side holds a finished prefill's blocks

    def validate(self, model: str) -> None:
        if not (0 < self.timeout_s <= 3600 and 0 < self.lease_s <= 3600):
            raise ValueError(f"model {model}: kv_transfer timeout_s and lease_s must be in (0, 3600] s")


class ModelSpec(msgspec.Struct, kw_only=True):
    name: str
    engine: EngineConfig
    tes: int = 1  # colocated TEs
    prefill_tes: int = 0  # prefill TEs (disaggregated serving needs prefill and decode TEs)
    decode_tes: int = 0
    policy: str = "combined"  # the TE within a group
    router: str = "fixed"  # which group(s) serve a request (policies/routers.py)
    router_params: dict[str, Any] = msgspec.field(default_factory=dict)
    kv_transfer: KVTransferSpec = msgspec.field(default_factory=KVTransferSpec)

    def group_tes(self, role: TERole) -> int:
        """The TEs of the model's `role` group (0: the model has no such group)."""
        return {TERole.COLOCATED: self.tes, TERole.PREFILL: self.prefill_tes, TERole.DECODE: self.decode_tes}[
            role
        ]

    def groups(self) -> list[tuple[TERole, int]]:
        """The model's groups with TEs, in role order."""
        return [(role, n) for role in TERole if (n := self.group_tes(role)) > 0]

    @property
    def disaggregated(self) -> bool:
        return self.prefill_tes > 0 and self.decode_tes > 0

    def validate(self) -> None:
        counts = {role: self.group_tes(role) for role in TERole}
        negative = [f"{role}={n}" for role, n in counts.items() if n < 0]
        if negative:
            raise ValueError(f"model {self.name}: tes must be >= 0 per group, got {', '.join(negative)}")
        if (self.prefill_tes > 0) != (self.decode_tes > 0):
            raise ValueError(
                f"model {self.name}: disaggregated serving needs both prefill and decode TEs, got "
                f"{self.prefill_tes} prefill and {self.decode_tes} decode"
            )
        if self.tes < 1 and not self.disaggregated:
            raise ValueError(f"model {self.name}: tes must be >= 1 (or give prefill and decode TEs), got 0")
        if self.policy not in POLICIES:
            raise ValueError(
                f"model {self.name}: unknown policy {self.policy!r}; choose from {sorted(POLICIES)}"
            )
        if self.router not in ROUTERS:
            raise ValueError(
                f"model {self.name}: unknown router {self.router!r}; choose from {sorted(ROUTERS)}"
            )
        self.kv_transfer.validate(self.name)
        try:  # refused here, at `deepflow serve`, rather than by every JE at its start
            make_router(self.router, make_policy(self.policy), **self.router_params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model {self.name}: router {self.router!r}: {exc}") from None

    def engine_for(self, role: TERole) -> EngineConfig:
        """The engine config of one of the model's `role` TEs: the one place the platform turns the engine's
        KV transfer on, for P and D TEs (the TE shell names its DistFlow agent after the TE)."""
        if role == TERole.COLOCATED:
            return self.engine
        return dataclasses.replace(self.engine, kv_transfer=True)


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
            m.validate()
        if self.job_executors < 1:
            raise ValueError(f"job_executors must be >= 1, got {self.job_executors}")
        self.api.validate()

    @property
    def total_tes(self) -> int:
        return sum(n for m in self.models for _, n in m.groups())

    def te_ids(self) -> list[tuple[str, ModelSpec, TERole]]:
        """Every TE's id with its model and role: te-0, te-1, ... (colocated), te-p0, ... (prefill), te-d0,
        ... (decode), each role numbered across the models in order."""
        out: list[tuple[str, ModelSpec, TERole]] = []
        for role in TERole:
            members = [m for m in self.models for _ in range(m.group_tes(role))]
            out += [(f"{TE_ID_PREFIX[role]}{i}", m, role) for i, m in enumerate(members)]
        return out

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


def parse_pd(text: str) -> tuple[int, int]:
    """`--pd P:D` -> (prefill TEs, decode TEs), both >= 1."""
    prefill, sep, decode = text.partition(":")
    try:
        counts = (int(prefill), int(decode)) if sep else None
    except ValueError:
        counts = None
    if counts is None or min(counts) < 1:
        raise ValueError(
            f"--pd takes P:D, the prefill and decode TE counts (each >= 1), e.g. 1:1; got {text!r}"
        )
    return counts


def _group_counts(entry: dict[str, Any], where: str) -> dict[TERole, int]:
    """A model entry's TEs per role: `tes` (colocated) and/or `groups: [{role, tes}]`."""
    counts = dict.fromkeys(TERole, 0)
    groups = entry.get("groups")
    if groups is None:
        counts[TERole.COLOCATED] = int(entry.get("tes", 1))
        return counts
    if not isinstance(groups, list):
        raise ValueError(f"{where}.groups must be a list of {{role, tes}}")
    counts[TERole.COLOCATED] = int(entry.get("tes", 0))
    for j, group in enumerate(groups):
        if not isinstance(group, dict) or set(group) - {"role", "tes"} or "role" not in group:
            raise ValueError(f"{where}.groups[{j}] must be a mapping with role and tes")
        try:
            role = TERole(group["role"])
        except ValueError:
            raise ValueError(
                f"{where}.groups[{j}]: unknown role {group['role']!r}; choose from {[str(r) for r in TERole]}"
            ) from None
        if counts[role] and (role != TERole.COLOCATED or "tes" in entry):
            raise ValueError(f"{where}: the {role} group is given twice")
        counts[role] = int(group.get("tes", 1))
    return counts


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
        extra = sorted(
            set(entry) - {"name", "tes", "groups", "policy", "router", "router_params", "kv_transfer"}
        )
        if extra:
            raise ValueError(f"{path}: models[{i}] has unknown keys {extra}")
        where = f"{path}: models[{i}]"
        counts = _group_counts(entry, where)
        kv = dict(entry.get("kv_transfer") or {})
        unknown_kv = sorted(set(kv) - set(KVTransferSpec.__struct_fields__))
        if unknown_kv:
            raise ValueError(f"{where}.kv_transfer has unknown settings {unknown_kv}")
        router_params = entry.get("router_params") or {}
        if not isinstance(router_params, dict):
            raise ValueError(f"{where}.router_params must be a mapping")
        try:
            kv_spec = msgspec.convert(kv, KVTransferSpec)
        except msgspec.ValidationError as exc:
            raise ValueError(f"{where}.kv_transfer: {exc}") from None
        models.append(
            ModelSpec(
                name=served_name(engine, entry.get("name")),
                engine=engine,
                tes=counts[TERole.COLOCATED],
                prefill_tes=counts[TERole.PREFILL],
                decode_tes=counts[TERole.DECODE],
                policy=str(entry.get("policy", "combined")),
                router=str(entry.get("router", "fixed")),
                router_params=dict(router_params),
                kv_transfer=kv_spec,
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
