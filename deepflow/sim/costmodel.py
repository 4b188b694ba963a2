"""Step time of a simulated TE: a linear model over a step's batch shape, fitted to the real engine.

A step's features are computed from what the scheduler sent (`SchedulerOutput`) and where each request
stands (tokens already computed):

- `const`: 1 (launch, sampling, Python overhead of one step)
- `tokens`: Σ tokens computed (the linear layers' rows)
- `prefill_attention`: Σ over prefill chunks of q·(start + (q+1)/2) / 1,000 (query × key pairs of causal
  attention over the cached context: the Σprefill² term and its cross term with the context)
- `decode_context`: Σ over decodes of the context length / 1,000 (KV read per decoded token)
- `sequences`: requests in the step (per-sequence work: metadata, sampling, the logits row)

step seconds = max(`min_step_seconds`, Σ coefficient × feature) + `copy_seconds_per_block` × KV blocks copied
(tiers, copy-on-write). `deepflow sim calibrate` fits the coefficients by least squares (non-negative) to
steps measured on the real engine; a profile may also be written by hand (`"kind": "hand-written"`).

Pure: json and arithmetic; the fit needs numpy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_PROFILE",
    "FEATURES",
    "HardwareProfile",
    "ModelShape",
    "StepShape",
    "fit_profile",
    "load_profile",
]

FORMAT = "deepflow-sim-profile/1"
FEATURES = ("const", "tokens", "prefill_attention", "decode_context", "sequences")
DEFAULT_PROFILE = Path(__file__).with_name("profiles") / "smollm2-135m-bf16-cpu.json"
KINDS = ("fitted", "hand-written")


@dataclass(frozen=True)
class ModelShape:
    """What the simulator needs of a model: the KV bytes of a block, its context limit and its EOS."""

    name: str = "SmolLM2-135M-Instruct"
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype_bytes: int = 2
    max_position_embeddings: int = 8192
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = (2,)
    vocab_size: int = 49152

    def kv_bytes_per_block(self, block_size: int) -> int:
        """As the model runner sizes its pools: K and V of every layer for `block_size` tokens."""
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], dtype: str = "bfloat16", name: str = "") -> ModelShape:
        """From a model folder's config.json (as `ModelArgs.from_hf_config` reads the same fields)."""
        num_heads = config["num_attention_heads"]
        arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        window = config.get("sliding_window")
        if not config.get("use_sliding_window", arch == "MistralForCausalLM"):
            window = None
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            name=name,
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            dtype_bytes=4 if dtype in ("float32", "fp32") else 2,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            sliding_window=window,
            eos_token_ids=eos_ids,
            vocab_size=config["vocab_size"],
        )

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: str = "bfloat16") -> ModelShape:
        path = Path(folder)
        return cls.from_hf_config(json.loads((path / "config.json").read_text()), dtype, path.name)


@dataclass
class StepShape:
    """One step's features (see the module docstring), accumulated by the simulated runner."""

    tokens: int = 0
    prefill_attention: float = 0.0
    decode_context: float = 0.0
    sequences: int = 0

    def add(self, start: int, num_new: int) -> None:
        self.tokens += num_new
        self.sequences += 1
        if num_new == 1:
            self.decode_context += (start + 1) / 1e3
        else:
            self.prefill_attention += num_new * (start + (num_new + 1) / 2) / 1e3

    def vector(self) -> list[float]:
        return [1.0, float(self.tokens), self.prefill_attention, self.decode_context, float(self.sequences)]


@dataclass
class HardwareProfile:
    """Coefficients (seconds per unit of each feature) of one model on one machine, and how well they fit."""

    coefficients: dict[str, float]
    kind: str = "hand-written"  # or "fitted" (by `deepflow sim calibrate`)
    description: str = ""
    model: ModelShape = field(default_factory=ModelShape)
    copy_seconds_per_block: float = 2e-5
    min_step_seconds: float = 0.0
    fit: dict[str, Any] = field(default_factory=dict)  # r2, mean_abs_pct_error, samples, grid, machine

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"profile kind must be one of {KINDS}, got {self.kind!r}")
        unknown = set(self.coefficients) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; the model's features are {FEATURES}")
        self.coefficients = {name: float(self.coefficients.get(name, 0.0)) for name in FEATURES}
        self._vector = list(self.coefficients.values())

    def step_seconds(self, shape: StepShape, copied_blocks: int = 0) -> float:
        c = self._vector
        t = (
            c[0]
            + c[1] * shape.tokens
            + c[2] * shape.prefill_attention
            + c[3] * shape.decode_context
            + c[4] * shape.sequences
        )
        return max(t, self.min_step_seconds) + self.copy_seconds_per_block * copied_blocks

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"]["eos_token_ids"] = list(self.model.eos_token_ids)
        return {"format": FORMAT, **data}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"not a {FORMAT} profile: format {data.get('format')!r}")
        model = dict(data.get("model") or {})
        if "eos_token_ids" in model:
            model["eos_token_ids"] = tuple(model["eos_token_ids"])
        return cls(
            coefficients={k: float(v) for k, v in data["coefficients"].items()},
            kind=data.get("kind", "hand-written"),
            description=data.get("description", ""),
            model=ModelShape(**model),
            copy_seconds_per_block=float(data.get("copy_seconds_per_block", 2e-5)),
            min_step_seconds=float(data.get("min_step_seconds", 0.0)),
            fit=dict(data.get("fit") or {}),
        )


def load_profile(path: str | Path | None = None) -> HardwareProfile:
    """A profile from JSON; None: the fitted default shipped with the package (SmolLM2-135M, bf16, CPU)."""
    path = DEFAULT_PROFILE if path is None else Path(path)
    return HardwareProfile.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def fit_profile(shapes: Sequence[StepShape], seconds: Sequence[float], **profile: Any) -> HardwareProfile:
    """Least squares with non-negative coefficients (a feature whose coefficient comes out negative is
    dropped and the rest refitted); the fit's R² and mean absolute percentage error go into `fit`."""
    import numpy as np

    if len(shapes) != len(seconds) or len(shapes) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} measured steps, one time per shape")
    x = np.array([s.vector() for s in shapes], dtype=np.float64)
    y = np.array(seconds, dtype=np.float64)
    # Relative errors matter (a 5 ms decode step as much as a 500 ms prefill): weight rows by 1/y.
    w = 1.0 / np.maximum(y, 1e-6)

    def solve(rows: np.ndarray) -> np.ndarray:
        active = list(range(len(FEATURES)))
        while True:
            coef, *_ = np.linalg.lstsq(x[rows][:, active] * w[rows, None], y[rows] * w[rows], rcond=None)
            negative = [a for a, c in zip(active, coef, strict=True) if c < 0 and a != 0]
            if not negative:
                break
            active.remove(min(negative, key=lambda a: coef[active.index(a)]))
        full = np.zeros(len(FEATURES))
        full[active] = coef
        return full

    full = solve(np.arange(len(y)))
    # A shared machine stalls some steps (other processes' bursts): refit without the steps that took more
    # than twice what the first fit predicts, if they are few. The error is reported over every step.
    ratio = y / np.maximum(x @ full, 1e-9)
    kept = np.flatnonzero(ratio < 2.0)
    outliers = len(y) - len(kept)
    if 0 < outliers <= len(y) // 10 and len(kept) >= len(FEATURES):
        full = solve(kept)
    predicted = x @ full
    ss_res = float(((y - predicted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    fit = dict(profile.pop("fit", {}))
    fit.update(
        r2=round(1.0 - ss_res / ss_tot, 4),
        mean_abs_pct_error=round(float(np.mean(np.abs(predicted - y) / y)) * 100, 2),
        samples=len(y),
        outliers_refitted=outliers if 0 < outliers <= len(y) // 10 else 0,
        measured=[
            [*(round(v, 6) for v in s.vector()[1:]), round(t, 6)]
            for s, t in zip(shapes, seconds, strict=True)
        ],
        measured_columns=[*FEATURES[1:], "seconds"],
    )
    return HardwareProfile(
        coefficients={name: float(c) for name, c in zip(FEATURES, full, strict=True)},
        kind="fitted",
        fit=fit,
        **profile,
    )
