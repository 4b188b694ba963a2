"""LoRA adapters on our own model's projections (no second model code: the engine's `LlamaModel` trains).

The engine fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`. An adapter per *original*
projection (PEFT's q_proj, k_proj, v_proj, gate_proj, up_proj, o_proj, down_proj, each with its own A and
B) keeps the usual LoRA parametrization — one shared A across a fused projection would be a different,
lower-rank model — and lets adapters be saved under PEFT's names and merged back exactly:
W_slice += (alpha / r) · B · A.

B starts at zero (the adapted model starts as the base model, exactly); A takes PEFT's default init
(Kaiming-uniform with a=√5) from a seeded generator, so two runs with one seed start identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from deepflow.engine.models.llama import LlamaModel

__all__ = ["DEFAULT_TARGETS", "LoRALinear", "adapter_state", "apply_lora", "load_adapter_state", "merge_lora"]

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus one low-rank adapter per output slice (`slices`: (name, rows))."""

    def __init__(
        self, base: nn.Linear, slices: list[tuple[str, int]], rank: int, alpha: float, gen: torch.Generator
    ) -> None:
        super().__init__()
        if sum(n for _, n in slices) != base.out_features:
            raise ValueError("slices must cover the layer's outputs")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.names = [name for name, _ in slices]
        self.sizes = [n for _, n in slices]
        self.rank = rank
        self.scale = alpha / rank
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix
        for n in self.sizes:
            a = (torch.rand(rank, base.in_features, generator=gen) * 2 - 1) * bound
            self.lora_A.append(nn.Parameter(a.to(dtype=dtype, device=device)))
            self.lora_B.append(nn.Parameter(torch.zeros(n, rank, dtype=dtype, device=device)))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        deltas = [(x @ a.t()) @ b.t() for a, b in zip(self.lora_A, self.lora_B, strict=True)]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)
        return out + delta * self.scale

    def merged_weight(self) -> torch.Tensor:
        parts = [b @ a for a, b in zip(self.lora_A, self.lora_B, strict=True)]
        return self.base.weight + torch.cat(parts, dim=0) * self.scale


def _slices(model: LlamaModel, target: str) -> list[tuple[str, int]]:
    a = model.args
    if target == "qkv_proj":
        return [("q_proj", a.num_heads * a.head_dim), ("k_proj", a.num_kv_heads * a.head_dim),
                ("v_proj", a.num_kv_heads * a.head_dim)]  # fmt: skip
    if target == "gate_up_proj":
        return [("gate_proj", a.intermediate_size), ("up_proj", a.intermediate_size)]
    if target == "o_proj":
        return [("o_proj", a.hidden_size)]
    if target == "down_proj":
        return [("down_proj", a.hidden_size)]
    raise ValueError(f"unknown LoRA target {target!r}; choose from {DEFAULT_TARGETS}")


def apply_lora(
    model: LlamaModel,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Freeze the model and wrap its `targets` with adapters; returns the trainable parameters in a fixed
    order. The model must hold plain `nn.Linear`s (loaded in fp32 or with the torch backend)."""
    if rank < 1:
        raise ValueError("rank must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    targets = tuple(targets)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                base = getattr(parent, name, None)
                if base is None:
                    continue
                if not isinstance(base, nn.Linear):
                    raise TypeError(
                        f"{name} is {type(base).__name__}, not nn.Linear: load the model unpacked"
                    )
                wrapped = LoRALinear(base, _slices(model, name), rank, alpha, gen)
                setattr(parent, name, wrapped)
                params += [*wrapped.lora_A, *wrapped.lora_B]
    return params


def _lora_modules(model: LlamaModel):
    for i, layer in enumerate(model.layers):
        for kind, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for attr, module in parent.named_children():
                if isinstance(module, LoRALinear):
                    yield i, kind, attr, module


def adapter_state(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
    and so on)."""
    state: dict[str, torch.Tensor] = {}
    for i, kind, _attr, m in _lora_modules(model):
        for name, a, b in zip(m.names, m.lora_A, m.lora_B, strict=True):
            prefix = f"base_model.model.model.layers.{i}.{kind}.{name}"
            state[f"{prefix}.lora_A.weight"] = a.detach().clone()
            state[f"{prefix}.lora_B.weight"] = b.detach().clone()
    return state


def load_adapter_state(model: LlamaModel, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapters into a model `apply_lora` has wrapped (same targets and rank)."""
    seen = 0
    with torch.no_grad():
        for i, kind, _attr, m in _lora_modules(model):
            for name, a, b in zip(m.names, m.lora_A, m.lora_B, strict=True):
                prefix = f"base_model.model.model.layers.{i}.{kind}.{name}"
                a.copy_(state[f"{prefix}.lora_A.weight"])
                b.copy_(state[f"{prefix}.lora_B.weight"])
                seen += 2
    if seen != len(state):
        raise ValueError(f"the adapter has {len(state)} tensors; the model takes {seen}")


def merge_lora(model: LlamaModel) -> None:
    """Fold every adapter into its base weight and unwrap it (a plain model again, for serving)."""
    with torch.no_grad():
        for _i, _kind, attr, m in list(_lora_modules(model)):
            m.base.weight.copy_(m.merged_weight())
            parent = next(p for p in model.modules() if getattr(p, attr, None) is m)
            setattr(parent, attr, m.base)
