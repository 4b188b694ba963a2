"""deepflow's Tokenizer must give the same ids, text and prompts as transformers on a real model folder."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepflow.engine.tokenizer import (
    ChatTemplateMissingError,
    Tokenizer,
    TokenizerFileNotFoundError,
    TokenizerPool,
)
from tests.engine.tokenizer_support import build_tokenizer_dir, hypothesis_settings


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer(tok_dir)


@pytest.fixture(scope="session")
def hf(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _copy_dir(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink(missing_ok=True)
    return dst


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    '{"key": [1, 2.5, null], "nested": {"a": "b"}}',
    "Emoji: 👋🏽 🧑‍🤝‍🧑 🇫🇷 ❤️ 🤖",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장.",
    "Accents: café naïve résumé Ångström façade Ελληνικά русский текст",
    "Whitespace   runs\n\n\n  and\ttabs\t\t and trailing   ",
    "   leading spaces",
    "\r\nWindows\r\nline endings\r\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> in the middle and <file_sep> too",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, α≈β, 1e-9 < ε",
    "zero\u200bwidth and \u00a0nbsp and \ufeffbom",
    "URL https://example.com/path?q=1&x=%20 and email a.b@c.io",
    "العربية نص من اليمين إلى اليسار",
    "a" * 300,
]


# -- encode / decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf: Any, text: str) -> None:
    for add_special_tokens in (True, False):
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf.encode(text, add_special_tokens=add_special_tokens)
    ids = tok.encode(text)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly


@hypothesis_settings(150)
@given(text=st.text(max_size=60))
def test_encode_random_text_matches_transformers(tok: Tokenizer, hf: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@hypothesis_settings(100)
@given(ids=st.lists(st.integers(min_value=0, max_value=49151), max_size=30))
def test_decode_random_ids_matches_transformers(tok: Tokenizer, hf: Any, ids: list[int]) -> None:
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_ids_and_vocab(tok: Tokenizer, hf: Any) -> None:
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.eos_token_ids == frozenset({hf.eos_token_id})
    assert set(hf.all_special_ids) <= tok.all_special_ids
    # Every id that decode skips is listed, and nothing else.
    for i in range(64):
        assert (tok.decode([i]) == "") == (i in tok.all_special_ids)
    ids = tok.encode("Hello <|im_end|> world")
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens([tok.vocab_size + 10])


def test_eos_ids_union_generation_config(tok_dir: Path, tmp_path: Path) -> None:
    folder = _copy_dir(tok_dir, tmp_path / "m")
    _edit_json(folder / "generation_config.json", eos_token_id=[2, 0])
    _edit_json(folder / "config.json", eos_token_id=5)
    assert Tokenizer(folder).eos_token_ids == frozenset({0, 2, 5})
    _edit_json(folder / "generation_config.json", eos_token_id=7)
    assert Tokenizer(folder).eos_token_ids == frozenset({2, 5, 7})


def test_bos_from_post_processor_matches_transformers(tok_dir: Path, tmp_path: Path) -> None:
    """A tokenizer.json whose post-processor adds BOS: encode adds it, encode_chat does not (as HF)."""
    from transformers import AutoTokenizer

    folder = _copy_dir(tok_dir, tmp_path / "m")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))
    mine, theirs = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert mine.encode("hi") == theirs.encode("hi") == [0, 6004]
    assert mine.encode("hi", add_special_tokens=False) == [6004]
    chat = [{"role": "user", "content": "hi"}]
    expected = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert mine.encode_chat(chat) == expected
    assert expected[0] != 0


def test_explicit_add_bos_and_eos_flags(tok_dir: Path, tmp_path: Path) -> None:
    """Explicit `add_bos_token`/`add_eos_token` are honoured (transformers 4 semantics; 5 ignores them)."""
    folder = _copy_dir(tok_dir, tmp_path / "m")
    _edit_json(
        folder / "tokenizer_config.json", add_bos_token=True, add_eos_token=True, bos_token="<|endoftext|>"
    )
    t = Tokenizer(folder)
    assert t.bos_token_id == 0
    assert t.encode("hi") == [0, 6004, 2]
    assert t.encode("hi", add_special_tokens=False) == [6004]
    assert t.encode_chat([{"role": "user", "content": "hi"}])[0] == 1  # no BOS added before the template
    _edit_json(folder / "tokenizer_config.json", add_bos_token=False, add_eos_token=False)
    assert Tokenizer(folder).encode("hi") == [6004]


def test_special_token_as_dict_in_config(tok_dir: Path, tmp_path: Path) -> None:
    folder = _copy_dir(tok_dir, tmp_path / "m")
    _edit_json(
        folder / "tokenizer_config.json",
        eos_token={"content": "<|endoftext|>", "lstrip": False, "rstrip": False, "special": True},
    )
    t = Tokenizer(folder)
    assert t.eos_token == "<|endoftext|>"
    assert t.eos_token_ids == frozenset({0})


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerFileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        TokenizerPool(tmp_path, workers=0)


# -- chat templates -----------------------------------------------------------------------------------------

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse. Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本 🗾"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply\n  with   spaces"},
        {"role": "user", "content": "second", "name": None},
    ],
]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf: Any, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    rendered = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ids


_FEATURE_TEMPLATE = """\
{%- set ns = namespace(count=0) -%}
{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'bad' %}{{ raise_exception('bad role: ' + message['role']) }}{% endif %}
    {%- if loop.index > 5 %}{% break %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
<{{ message['role'] }}>{{ message['content'] | tojson }}</{{ message['role'] }}>
    {%- if message.get('meta') %} {{ message['meta'] | tojson(indent=2, sort_keys=true) }}{% endif %}
{%- endfor %}
{%- if tools %} tools={{ tools | tojson }}{% endif %}
 n={{ ns.count }} year={{ strftime_now('%Y')|length }} custom={{ custom_var | default('none') }}
{%- if add_generation_prompt %}<assistant>{% generation %}{% endgeneration %}{% endif %}
{{ eos_token }}"""


@pytest.fixture
def feature_dir(tok_dir: Path, tmp_path: Path) -> Path:
    folder = _copy_dir(tok_dir, tmp_path / "feat")
    (folder / "chat_template.jinja").write_text(_FEATURE_TEMPLATE)
    return folder


def test_template_features_match_transformers(feature_dir: Path) -> None:
    """tojson (no HTML escaping, indent/sort_keys), namespace, loopcontrols, strftime_now, kwargs, tools."""
    from transformers import AutoTokenizer

    mine, theirs = Tokenizer(feature_dir), AutoTokenizer.from_pretrained(feature_dir)
    messages = [
        {"role": "user", "content": "<b>&'quote'\"</b> 你好", "meta": {"z": 1, "a": [True, None]}},
        {"role": "assistant", "content": "ok"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "<int>"}}}]
    for kwargs in ({}, {"custom_var": "hello"}, {"tools": tools}):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert mine.apply_chat_template(messages, add_generation_prompt=True, **kwargs) == expected
    # kwargs override the special-token variables, as in transformers.
    assert mine.apply_chat_template(messages, bos_token="[B]").startswith("[B]")
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        mine.apply_chat_template([{"role": "bad", "content": "x"}])


def test_template_sandbox_blocks_private_attributes(feature_dir: Path) -> None:
    (feature_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(feature_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_sources(tok: Tokenizer, tok_dir: Path, tmp_path: Path) -> None:
    """chat_template.json, tokenizer_config.json and named templates render like chat_template.jinja."""
    template = (tok_dir / "chat_template.jinja").read_text()
    chat = CHATS[1]
    expected = tok.apply_chat_template(chat)

    as_json = _copy_dir(tok_dir, tmp_path / "json", drop=("chat_template.jinja",))
    (as_json / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert Tokenizer(as_json).apply_chat_template(chat) == expected

    in_config = _copy_dir(tok_dir, tmp_path / "config", drop=("chat_template.jinja",))
    _edit_json(in_config / "tokenizer_config.json", chat_template=template)
    assert Tokenizer(in_config).apply_chat_template(chat) == expected

    named = _copy_dir(tok_dir, tmp_path / "named", drop=("chat_template.jinja",))
    _edit_json(
        named / "tokenizer_config.json",
        chat_template=[{"name": "default", "template": template}, {"name": "tool_use", "template": "TOOLS"}],
    )
    t = Tokenizer(named)
    assert t.apply_chat_template(chat) == expected
    assert t.apply_chat_template(chat, tools=[{"name": "f"}]) == "TOOLS"


def test_missing_chat_template(tok_dir: Path, tmp_path: Path) -> None:
    folder = _copy_dir(tok_dir, tmp_path / "m", drop=("chat_template.jinja",))
    t = Tokenizer(folder)
    assert not t.has_chat_template
    assert t.encode("still works") == Tokenizer(tok_dir).encode("still works")
    with pytest.raises(ChatTemplateMissingError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="empty conversation"):
        Tokenizer(tok_dir).apply_chat_template([])


# -- pool ---------------------------------------------------------------------------------------------


def test_pool_inline(tok: Tokenizer, tok_dir: Path) -> None:
    pool = TokenizerPool(tok_dir, workers=0)
    assert pool.encode_sync(TEXTS[5]) == tok.encode(TEXTS[5])
    assert asyncio.run(pool.encode_chat(CHATS[1])) == tok.encode_chat(CHATS[1])
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.encode_sync("x")


def test_pool_workers_match_inline(tok: Tokenizer, feature_dir: Path, tok_dir: Path) -> None:
    with TokenizerPool(tok_dir, workers=2) as pool:
        assert pool.workers == 2
        for text in TEXTS:
            assert pool.encode_sync(text) == tok.encode(text)
        assert pool.encode_sync("hi", add_special_tokens=False) == tok.encode("hi", add_special_tokens=False)
        assert pool.encode_chat_sync(CHATS[0], add_generation_prompt=False) == tok.encode_chat(
            CHATS[0], add_generation_prompt=False
        )

        async def run_many() -> tuple[list[list[int]], list[list[int]]]:
            texts = await asyncio.gather(*(pool.encode(t) for t in TEXTS))
            chats = await asyncio.gather(*(pool.encode_chat(c) for c in CHATS))
            return list(texts), list(chats)

        texts, chats = asyncio.run(run_many())
        assert texts == [tok.encode(t) for t in TEXTS]
        assert chats == [tok.encode_chat(c) for c in CHATS]

    # Template errors raised inside a worker reach the caller unchanged.
    with TokenizerPool(feature_dir, workers=1) as pool:
        with pytest.raises(jinja2.TemplateError, match="bad role"):
            pool.encode_chat_sync([{"role": "bad", "content": "x"}])
        assert pool.encode_chat_sync(CHATS[0], custom_var="v") == Tokenizer(feature_dir).encode_chat(
            CHATS[0], custom_var="v"
        )
    with pytest.raises(RuntimeError, match="closed"):
        pool.encode_sync("x")


def test_pool_missing_template_fails_in_caller(tok_dir: Path, tmp_path: Path) -> None:
    folder = _copy_dir(tok_dir, tmp_path / "m", drop=("chat_template.jinja",))
    with TokenizerPool(folder, workers=1) as pool, pytest.raises(ChatTemplateMissingError):
        asyncio.run(pool.encode_chat(CHATS[0]))
