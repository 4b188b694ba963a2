"""Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache, in plain PyTorch.

One file, gpt-fast style: `ModelArgs` is read from an HF `config.json`, weights are read with safetensors'
mmap and fused at load time (q/k/v into one projection, gate/up into one). Attention is not here: each layer
hands its q/k/v to the attention backend (engine/attention/) chosen at load, which writes and reads the paged
KV cache through the `AttentionMetadata` the model runner builds once per step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from deepflow.engine import kernels
from deepflow.engine.attention import AttentionBackend, AttentionMetadata, KVCache, VarlenCall, select_backend

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# The kernels' small fused ops the layers call in bf16 (engine/kernels/csrc/fused.cpp).
FUSED_OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Attention looks back at most this far; the engine caps the context to it, so full attention is exact.
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        window = config.get("sliding_window")
        if not config.get("use_sliding_window", arch == "MistralForCausalLM"):
            window = None
        num_heads = config["num_attention_heads"]
        # transformers 5 writes `rope_parameters` (theta inside); older folders `rope_theta` + `rope_scaling`.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            rope_scaling=rope or None,
            eos_token_ids=eos_ids,
            sliding_window=window,
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelArgs:
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()))


def _rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin for every position, computed in fp32 once (as HF does per call) and cast to the dtype."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = _rope_inv_freq(args)
        positions = torch.arange(args.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)


class RMSNorm(nn.Module):
    """RMSNorm that can take the residual stream with it (vLLM's fused add): `forward(x, residual)` returns
    (norm(x + residual), x + residual), one pass over the row instead of an add, a read and a norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = False  # FlowServe's fused C++ ops (set by LlamaModel.use_kernels)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernels:
            if residual is None:
                out = torch.empty_like(x)
                torch.ops.deepflow.rms_norm(out, x, self.weight, self.eps)
                return out, x
            # In place: x becomes the normed output, residual the new residual stream.
            torch.ops.deepflow.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            x = residual = residual + x  # HF's `residual + hidden_states`, in the model dtype
        else:
            residual = x
        if x.dtype != torch.float32:
            # One fused kernel (it normalizes in fp32 internally) instead of seven small ops per call.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps), residual
        # HF order of operations (normalize in fp32, cast, then scale) so fp32 results match bit for bit.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype), residual


class Attention(nn.Module):
    """The q/k/v and output projections; what happens between them is the attention backend's."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, backend: AttentionBackend, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = backend.store_kv(qk, v, kv_cache, meta)
        out = backend.forward(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight oneDNN has reordered once into its blocked layout, and, with the
    kernels, also packed for their small-batch GEMV, which serves the decode-sized calls.

    oneDNN's packing is 1.5-2x faster than `F.linear` for decode row counts (a 3072x576 projection at 1 row
    183 vs 285 us, at 32 rows 412 vs 650 us) and the same at prefill sizes. The kernels' `small_linear`
    streams each weight byte once per call for up to 16 rows and above that works in passes of 8 rows x 3
    column tiles re-read from L2; it was ahead of oneDNN at every row count measured, 1-64 (1.14x at 64;
    benchmarks/linear_kernels.py --rows, docs/benchmarks.md), so it serves every call up to `SMALL_ROWS`:
    decode batches and small chunks. The price is a second copy of the weights in memory.
    """

    SMALL_ROWS = 64

    def __init__(self, linear: nn.Linear, small: bool) -> None:
        super().__init__()
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight, 1), requires_grad=False)
        self.bias = linear.bias
        self.small = torch.ops.deepflow.pack_linear_weight(weight.contiguous()) if small else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is not None and x.shape[0] <= self.SMALL_ROWS:
            return torch.ops.deepflow.small_linear(x, self.small, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module, small: bool) -> None:
    """Swap every nn.Linear for a PackedLinear (bf16 with oneDNN, plus the kernels' GEMV layout when `small`;
    fp32 stays on F.linear, bit-exact with HF)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child, small))


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernels:
            act = torch.empty(x.shape[0], self.intermediate_size, dtype=x.dtype)
            torch.ops.deepflow.silu_and_mul(act, gate_up)
            return self.down_proj(act)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, backend, kv_cache, meta):  # type: ignore[no-untyped-def]
        # The residual stream travels beside x: each norm adds the previous block's output into it.
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, backend, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Token ids in, last-position logits out; KV lives in caches owned by the model runner."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype) -> None:
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args, dtype)
        self.attention: AttentionBackend | None = None  # set by load_model, once the rope tables exist
        self.fused_kernels = False  # the kernels' fused bf16 ops and GEMV in use (set_backend)
        # Per layer, the weights `deepflow::decoder_layer` takes (the one-call decode path); None: not in use.
        self._layer_weights: list[tuple] | None = None

    def set_backend(self, name: str) -> None:
        """`kernels`: FlowServe's C++ ops for attention and, in bf16, the fused small ops; `torch`: torch ops
        throughout (any device, bit-exact with HF in fp32); `auto`: kernels where they run."""
        args = self.args
        backend = select_backend(name, self.rotary.cos.device, args.head_dim)
        self.attention = backend(
            args.num_heads, args.num_kv_heads, args.head_dim, self.rotary.cos, self.rotary.sin
        )
        fused = backend.name == "kernels" and self.dtype == torch.bfloat16 and kernels.available(*FUSED_OPS)
        self.fused_kernels = fused
        for module in self.modules():
            if isinstance(module, RMSNorm | MLP):
                module.kernels = fused

    def enable_layer_calls(self) -> None:
        """Decode steps of up to SMALL_ROWS tokens run each layer as one `deepflow::decoder_layer` call (the
        same ops in the same order, from C++: ~3 ms less Python per SmolLM2 step). Needs packed linears."""
        weights = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(isinstance(m, PackedLinear) and m.small is not None for m in linears):
                return
            weights.append(
                (
                    layer.input_layernorm.weight,
                    layer.post_attention_layernorm.weight,
                    layer.input_layernorm.eps,
                    attn.qkv_proj.small,
                    attn.qkv_proj.bias,
                    attn.o_proj.small,
                    mlp.gate_up_proj.small,
                    mlp.down_proj.small,
                )
            )
        self._layer_weights = weights

    def _layer_calls(
        self,
        x: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        call: VarlenCall,
        after_layer: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._layer_weights is not None
        args, rotary = self.args, self.rotary
        attention = self.attention
        assert attention is not None
        residual = torch.empty_like(x)
        for i, (weights, (k_cache, v_cache)) in enumerate(zip(self._layer_weights, kv_caches, strict=True)):
            x = torch.ops.deepflow.decoder_layer(
                x, residual, i == 0, *weights, rotary.cos, rotary.sin, meta.positions, k_cache, v_cache,
                meta.slot_mapping, call.block_tables, call.seq_lens, call.query_start_loc, args.num_heads,
                args.num_kv_heads, args.head_dim, args.intermediate_size, attention.scale,
            )  # fmt: skip
            if after_layer is not None:
                after_layer(i)  # the op returned: this layer's K/V is in the cache (CPU ops are synchronous)
        return x, residual

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """`after_layer(i)` runs once layer i has written this step's K/V (the KV connector's by-layer sends,
        on either path: the per-layer modules or the fused `deepflow::decoder_layer` calls)."""
        assert self.attention is not None, "load_model sets the attention backend"
        self.attention.prepare(meta)
        x = self.embed_tokens(input_ids)
        call = None
        if self._layer_weights is not None and x.shape[0] <= PackedLinear.SMALL_ROWS:
            call = self.attention.single_call(meta)
        if call is not None:
            x, residual = self._layer_calls(x, kv_caches, meta, call, after_layer)
        else:
            residual = None
            for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=False)):
                x, residual = layer(x, residual, self.attention, kv_cache, meta)
                if after_layer is not None:
                    after_layer(i)
        # Only the positions that sample pay for the final norm and the LM head.
        assert residual is not None
        x, _ = self.norm(x[logits_indices], residual[logits_indices])
        return self.lm_head(x).float()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> LlamaModel:
    """Build the model from an HF folder, reading tensors through safetensors' mmap and fusing projections.

    `backend` names the compute path (auto, kernels, torch: see `LlamaModel.set_backend`); weights land on
    `device`.
    """
    device = torch.device(device)
    folder = Path(folder)
    args = ModelArgs.from_folder(folder)
    with torch.device("meta"):
        model = LlamaModel(args, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if "rotary_emb.inv_freq" in name:
                    continue
                tensors[name.removeprefix("model.")] = f.get_tensor(name)

    def take(name: str) -> torch.Tensor:
        try:
            return tensors.pop(name).to(device=device, dtype=dtype)
        except KeyError:
            raise ValueError(f"weight {name!r} missing from {folder}") from None

    state: dict[str, torch.Tensor] = {
        "embed_tokens.weight": take("embed_tokens.weight"),
        "norm.weight": take("norm.weight"),
    }
    for i in range(args.num_layers):
        p = f"layers.{i}."
        attn = p + "self_attn."
        state[attn + "qkv_proj.weight"] = torch.cat([take(attn + f"{n}_proj.weight") for n in "qkv"])
        if args.qkv_bias:
            state[attn + "qkv_proj.bias"] = torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"])
        state[attn + "o_proj.weight"] = take(attn + "o_proj.weight")
        state[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
        )
        state[p + "mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight")
        state[p + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        state[p + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
    lm_head = tensors.pop("lm_head.weight", None)
    if args.tie_word_embeddings or lm_head is None:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    else:
        state["lm_head.weight"] = lm_head.to(device=device, dtype=dtype)
    leftover = [n for n in tensors if not n.startswith("lm_head")]
    if leftover:
        raise ValueError(f"unexpected weights in {folder}: {leftover[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    with torch.device(device):
        model.rotary = RotaryEmbedding(args, dtype)
    model.set_backend(backend)
    if can_pack(dtype, device):
        small = model.fused_kernels and kernels.available("pack_linear_weight", "small_linear")
        pack_linears(model, small)
        if small and kernels.available("decoder_layer"):
            model.enable_layer_calls()
    return model.eval()
