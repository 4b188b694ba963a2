"""A fine-tuned model as an HF folder: adapters merged, projections un-fused back to HF's names.

The served result of a fine-tuning job (`<base>:ft-<suffix>-<id>`) is such a folder, loaded by a TE like
any other model. The base folder's config, tokenizer and template files are copied as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepflow.engine.models.llama import LlamaModel
from deepflow.finetune.lora import merge_lora

__all__ = ["save_merged"]


def _hf_state(model: LlamaModel) -> dict[str, torch.Tensor]:
    a = model.args
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    state = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        for name, w in zip("qkv", attn.qkv_proj.weight.split([q, kv, kv]), strict=True):
            state[f"{p}self_attn.{name}_proj.weight"] = w
        if attn.qkv_proj.bias is not None:
            for name, b in zip("qkv", attn.qkv_proj.bias.split([q, kv, kv]), strict=True):
                state[f"{p}self_attn.{name}_proj.bias"] = b
        state[f"{p}self_attn.o_proj.weight"] = attn.o_proj.weight
        gate, up = mlp.gate_up_proj.weight.split(a.intermediate_size)
        state[f"{p}mlp.gate_proj.weight"] = gate
        state[f"{p}mlp.up_proj.weight"] = up
        state[f"{p}mlp.down_proj.weight"] = mlp.down_proj.weight
        state[f"{p}input_layernorm.weight"] = layer.input_layernorm.weight
        state[f"{p}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    if not a.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_merged(model: LlamaModel, base_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge `model`'s adapters (in place) and write it as an HF folder at `out_dir` (atomically)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    merge_lora(model)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    save_file(_hf_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
