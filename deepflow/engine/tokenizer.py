"""Tokenizer loaded straight from a local Hugging Face model folder, without transformers.

Serving needs only `tokenizer.json` (run by the Rust `tokenizers` library), the chat template and the
special-token settings, so we read those files ourselves and mirror what `transformers` does with them.
Encoding a long prompt holds the GIL, so `TokenizerPool` can move that work into worker processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _BackendTokenizer

__all__ = [
    "ChatTemplateMissingError",
    "Tokenizer",
    "TokenizerError",
    "TokenizerFileNotFoundError",
    "TokenizerPool",
    "default_tokenizer_workers",
]

# The named special tokens of transformers' `special_tokens_map`; chat templates see them as variables.
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

Message = Mapping[str, Any]


class TokenizerError(Exception):
    """Base class for tokenizer errors that callers may want to report to a client."""


class TokenizerFileNotFoundError(TokenizerError, FileNotFoundError):
    """The model folder has no `tokenizer.json` (slow-only SentencePiece/tiktoken folders are unsupported)."""


class ChatTemplateMissingError(TokenizerError, ValueError):
    """A chat request reached a model whose folder ships no chat template."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """Special tokens are stored either as plain strings or as serialized `AddedToken` dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    """`eos_token_id` in config files may be an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker); render the body as is."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` HTML-escapes `<>&'`, which would corrupt tool schemas; HF uses plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates with; templates are written against it."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env


class Tokenizer:
    """A model folder's tokenizer: encode/decode, special ids and chat template, matching transformers."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        tokenizer_file = self.path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerFileNotFoundError(
                f"no tokenizer.json in {self.path}: deepflow needs a fast (Rust) tokenizer file; convert the "
                "tokenizer once with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(...))"
            )
        self._backend = _BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(self.path / "tokenizer_config.json")
        legacy_map = _read_json(self.path / "special_tokens_map.json")

        self._special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(config.get(key, legacy_map.get(key)))
            if content is not None:
                self._special_tokens[key] = content
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):  # transformers 5 may name them: {"image_token": "<image>"}
            extra = list(extra.values())
        extra_tokens = [t for t in (_token_content(v) for v in extra) if t] if isinstance(extra, list) else []
        # Like transformers: special tokens named in the config but missing from tokenizer.json get added.
        missing = [
            t for t in [*self._special_tokens.values(), *extra_tokens] if self._backend.token_to_id(t) is None
        ]
        if missing:
            self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        self._named_special_ids = frozenset(
            i
            for i in (self._backend.token_to_id(t) for t in [*self._special_tokens.values(), *extra_tokens])
            if i is not None
        )
        self._apply_bos_eos_flags(config)
        self._chat_template = self._load_chat_template(config)

        eos_ids = set() if self.eos_token_id is None else {self.eos_token_id}
        eos_ids.update(_as_id_list(_read_json(self.path / "generation_config.json").get("eos_token_id")))
        model_config = _read_json(self.path / "config.json")
        eos_ids.update(_as_id_list(model_config.get("eos_token_id")))
        text_config = model_config.get("text_config")
        if isinstance(text_config, Mapping):
            eos_ids.update(_as_id_list(text_config.get("eos_token_id")))
        self._eos_token_ids = frozenset(eos_ids)

    def _apply_bos_eos_flags(self, config: Mapping[str, Any]) -> None:
        """Honour explicit `add_bos_token`/`add_eos_token` the way transformers' `update_post_processor` does.

        Without either flag the post-processor in tokenizer.json decides (it already carries the model's BOS).
        """
        if "add_bos_token" not in config and "add_eos_token" not in config:
            return
        bos, eos = self.bos_token, self.eos_token
        add_bos = bool(config.get("add_bos_token")) and self.bos_token_id is not None
        add_eos = bool(config.get("add_eos_token")) and self.eos_token_id is not None
        single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
        pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
        special: list[tuple[str, int]] = []
        if add_bos:
            special.append((bos, self.bos_token_id))  # type: ignore[arg-type]
        if add_eos:
            special.append((eos, self.eos_token_id))  # type: ignore[arg-type]
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    def _load_chat_template(self, config: Mapping[str, Any]) -> str | dict[str, str] | None:
        """Separate template files win over `tokenizer_config.json`, as in transformers."""
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        from_json = _read_json(self.path / "chat_template.json").get("chat_template")
        template = from_json if from_json is not None else config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template if isinstance(t, Mapping)}
            return named["default"] if set(named) == {"default"} else named
        if isinstance(template, str | dict):
            return template
        return None

    # -- special tokens -------------------------------------------------------------------------------------

    def _special_id(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS; generation should stop on any of `eos_token_ids`."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's EOS plus `eos_token_id` of generation_config/config."""
        return self._eos_token_ids

    @cached_property
    def all_special_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops: every added token flagged special.

        A superset of transformers' `all_special_ids`, which lists only the named special tokens.
        """
        flagged = {i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special}
        return frozenset(flagged | self._named_special_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`, for callers that need offsets or batch APIs."""
        return self._backend

    # -- encode / decode ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the folder's BOS/EOS rules like transformers."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. No `clean_up_tokenization_spaces`: it corrupts BPE text and cannot be streamed."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Raw vocabulary strings (e.g. 'Ġhello'); raises ValueError for ids outside the vocabulary."""
        tokens = []
        for i in ids:
            token = self._backend.id_to_token(i)
            if token is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            tokens.append(token)
        return tokens

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        return [self._backend.token_to_id(t) for t in tokens]

    # -- chat -----------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        return self._chat_template

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def _template_source(self, tools: Sequence[Any] | None) -> str:
        """Pick the template the way transformers' `get_chat_template` does (named ones: tool_use/default)."""
        template = self._chat_template
        if template is None:
            raise ChatTemplateMissingError(
                f"{self.path} has no chat template (none in tokenizer_config.json, chat_template.jinja or "
                "chat_template.json); use the completions API with a plain prompt instead"
            )
        if isinstance(template, str):
            return template
        if tools is not None and "tool_use" in template:
            return template["tool_use"]
        if "default" in template:
            return template["default"]
        raise ChatTemplateMissingError(
            f"{self.path} has several chat templates ({sorted(template)}) and none is named 'default'"
        )

    def _compiled_template(self, tools: Sequence[Any] | None) -> jinja2.Template:
        source = self._template_source(tools)
        cache: dict[str, jinja2.Template] = self.__dict__.setdefault("_template_cache", {})
        compiled = cache.get(source)
        if compiled is None:
            compiled = cache[source] = _make_jinja_env().from_string(source)
        return compiled

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's template exactly as `apply_chat_template(tokenize=False)` would.

        Extra keyword arguments become template variables (e.g. `enable_thinking=False`) and override the
        special-token variables (`bos_token`, `eos_token`, ...).
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        for message in messages:
            if not isinstance(message, Mapping):
                raise TypeError(f"chat messages must be mappings, got {type(message).__name__}")
        # transformers drops None values (e.g. OpenAI's content=None) because templates test for missing keys.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        template = self._compiled_template(tools)
        variables = {**self._special_tokens, **kwargs}
        return template.render(
            messages=chat,
            tools=None if tools is None else list(tools),
            documents=None if documents is None else list(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Prompt ids of a chat; the template writes BOS where the model wants one, so none is added."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


# -- process pool -----------------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)


def _worker() -> Tokenizer:
    assert _worker_tokenizer is not None, "tokenizer worker used before its initializer ran"
    return _worker_tokenizer


def _worker_encode(text: str, add_special_tokens: bool) -> list[int]:
    return _worker().encode(text, add_special_tokens=add_special_tokens)


def _worker_encode_chat(
    messages: list[dict[str, Any]], add_generation_prompt: bool, kwargs: dict[str, Any]
) -> list[int]:
    return _worker().encode_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)


def default_tokenizer_workers() -> int:
    """Workers only pay off where spare cores exist; small machines tokenize inline."""
    cpus = os.cpu_count() or 1
    return 0 if cpus < 8 else min(4, cpus // 8)


class TokenizerPool:
    """Tokenize prompts in worker processes so long prompts don't stall the event loop or the scheduler.

    Each worker loads the tokenizer once. With `workers=0` every call runs inline in the caller's thread.
    Decoding stays in the caller (see `tokenizer`): it is incremental and cheap.
    """

    def __init__(
        self, path: str | os.PathLike[str], workers: int | None = None, start_method: str = "spawn"
    ) -> None:
        # Load here too: errors surface in the caller, and decode/special ids need a local copy anyway.
        self.tokenizer = Tokenizer(path)
        self.workers = default_tokenizer_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        self._closed = False
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        if self.workers > 0:
            # spawn/forkserver: forking a process that runs torch or asyncio threads is unsafe.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context(start_method),
                initializer=_init_worker,
                initargs=(str(self.tokenizer.path),),
            )

    def _check_chat(self, messages: Sequence[Message], kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Fail in the caller for what is visible here (no template, syntax error) rather than in a worker."""
        self.tokenizer._compiled_template(kwargs.get("tools"))
        return [dict(m) for m in messages]

    def _submit(self, fn: Callable[..., list[int]], *args: Any) -> concurrent.futures.Future[list[int]]:
        if self._closed:
            raise RuntimeError("TokenizerPool is closed")
        assert self._executor is not None
        return self._executor.submit(fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Like `Tokenizer.encode`, off the event loop when the pool has workers."""
        if self._executor is None:
            return self.encode_sync(text, add_special_tokens)
        return await asyncio.wrap_future(self._submit(_worker_encode, text, add_special_tokens))

    async def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Like `Tokenizer.encode_chat`, off the event loop when the pool has workers."""
        if self._executor is None:
            return self.encode_chat_sync(messages, add_generation_prompt, **kwargs)
        chat = self._check_chat(messages, kwargs)
        return await asyncio.wrap_future(
            self._submit(_worker_encode_chat, chat, add_generation_prompt, kwargs)
        )

    def encode_sync(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._executor is None:
            self._check_open()
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return self._submit(_worker_encode, text, add_special_tokens).result()

    def encode_chat_sync(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        if self._executor is None:
            self._check_open()
            return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        chat = self._check_chat(messages, kwargs)
        return self._submit(_worker_encode_chat, chat, add_generation_prompt, kwargs).result()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TokenizerPool is closed")

    def close(self) -> None:
        """Stop the workers (waiting for running calls); idempotent."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
