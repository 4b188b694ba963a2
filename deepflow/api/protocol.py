"""Request and response bodies of the OpenAI-compatible API (pydantic v2).

Requests are strict (`extra="forbid"`, no type coercion) because OpenAI rejects unknown fields and wrong
types with a 400: a typo such as `max_token` must fail loudly instead of silently generating 16 tokens.
Known OpenAI parameters that DeepFlow cannot honour are declared here only so that `check_supported()` can
refuse them with a message naming the parameter. `null` means "default" for every optional field, as in
OpenAI. Responses are plain models: clients ignore fields they do not know (`stop_reason` is vLLM's).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deepflow.api.errors import invalid, unsupported
from deepflow.api.limits import INT64_MAX, INT64_MIN
from deepflow.engine.sampling_params import SamplingParams

_INT32_MAX = 2**31 - 1
MAX_CACHE_SALT = 256  # a salt is a tenant label, not a payload; every JE keeps it per context and request
MAX_MODEL_NAME = 256
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions, also when max_tokens is null
_ROLES = ("system", "developer", "user", "assistant")


class StrictModel(BaseModel):
    # No NaN/Infinity: every float we take is a sampling parameter or a TTL with a finite range.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def accepts(*values: Any) -> Any:
    """A parameter refused by name (`unsupported`) unless it has one of `values`: typed `Any` so that the
    refusal, not pydantic, words the error, while the schema lists what is accepted (for clients and the
    fuzzer, which would otherwise send values every request is refused for)."""
    return Field(default=None, json_schema_extra={"enum": [None, *values]})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- chat messages ---------------------------------------------------------------------------------------
class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    # The schema says what `_content_present` checks: only an assistant message may go without content.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"const": "assistant"}}},
            "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    )
    # A plain str checked by `_known_role` (so that 'tool' is told tool calling is unsupported); the schema
    # still lists the roles, for clients and the fuzzer.
    role: str = Field(json_schema_extra={"enum": list(_ROLES)})
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Tool/function calling is not supported: declared to be refused by name (see `check_supported`).
    tool_calls: list[Any] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    tool_call_id: str | None = accepts()
    function_call: Any = accepts()

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """Say plainly that images/audio/files are unsupported instead of listing failed union branches."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content[{j}] has type {kind!r}; only 'text' content parts are supported")
        return value

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise ValueError(f"role {role!r} is not supported: this server does not support tool calling")
        if role not in _ROLES:
            raise ValueError(f"role must be one of {', '.join(map(repr, _ROLES))}, got {role!r}")
        return role

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        """Text parts are joined with newlines (vLLM does the same)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        """The dict a chat template expects; OpenAI's newer `developer` role is the `system` role."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message


def check_messages(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        for field in ("tool_calls", "tool_call_id", "function_call"):
            value = getattr(message, field)
            if value is not None and value != []:
                raise unsupported(f"messages[{i}].{field}", "tool calling is not supported")


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    # OpenAI pads streamed chunks against length side channels; there is nothing to pad here.
    include_obfuscation: bool | None = None


# ---- shared sampling fields ------------------------------------------------------------------------------
class SamplingRequest(StrictModel):
    """Fields common to completions and chat: OpenAI's sampling parameters plus vLLM's extensions."""

    model: str = Field(max_length=MAX_MODEL_NAME)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user label for abuse tracking; nothing to track here
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={"maxProperties": 0})
    # Extensions (vLLM names and semantics).
    top_k: int | None = Field(default=None, ge=-1, le=_INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)  # 1: none; HF uses ~1.0-1.5
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=_INT32_MAX)  # and it must fit the context
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_INT32_MAX)]] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = Field(default=None, ge=-_INT32_MAX, le=_INT32_MAX)  # lower runs first
    # Context caching: the prompt continues this context (POST /v1/contexts); the salt namespaces the
    # prefix cache (vLLM's `cache_salt`): requests with different salts never share cached KV.
    context_id: str | None = Field(default=None, max_length=256)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT)

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse what cannot be honoured; called after validation, before anything runs."""
        if self.logit_bias:
            raise unsupported("logit_bias")
        if self.stream_options is not None and not self.stream:
            raise invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; their own `validate()` catches cross-field conflicts (400)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            n=self.n or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            logprobs=logprobs,
            skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
        )
        try:
            params.validate()
        except ValueError as exc:
            message = str(exc)
            name = message.split(" ", 1)[0]
            raise invalid(message, param=name if name in SamplingParams.__struct_fields__ else None) from None
        return params


# ---- completions -----------------------------------------------------------------------------------------
PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    def max_new_tokens(self) -> int:
        """OpenAI's 16 when absent or null: a completion never runs to the context's end by omission."""
        return DEFAULT_COMPLETION_TOKENS if self.max_tokens is None else self.max_tokens

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """One clear message instead of pydantic's four failed union branches."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(isinstance(x, str) for x in value) or all(_is_int(x) for x in value):
                return value
            if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in value):
                return value
        raise ValueError(
            "must be a string, a non-empty list of strings, a non-empty list of token ids, "
            "or a list of non-empty lists of token ids"
        )

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: OpenAI answers each one with `n` choices."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(_is_int(x) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise unsupported("suffix", "insertion needs a fill-in-the-middle model")
        n = self.n or 1
        if self.best_of is not None and self.best_of != n:
            if self.best_of < n:
                raise invalid(f"best_of ({self.best_of}) must be >= n ({n})", param="best_of")
            raise unsupported("best_of", "only best_of == n is supported")
        if self.echo and self.logprobs is not None:
            raise unsupported("logprobs", "echo with logprobs needs prompt logprobs, which are not supported")


# ---- chat ------------------------------------------------------------------------------------------------
class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated by OpenAI, still accepted
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Labels without effect on the output (as `user`).
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Known OpenAI parameters that are refused unless given their neutral value (see `check_supported`).
    tools: Any = accepts()
    tool_choice: Any = accepts("none")
    functions: Any = accepts()
    function_call: Any = accepts("none")
    parallel_tool_calls: Any = accepts()
    response_format: Any = accepts({"type": "text"})
    audio: Any = accepts()
    modalities: Any = accepts(["text"])
    prediction: Any = accepts()
    store: Any = accepts(False)
    service_tier: Any = accepts("auto", "default")
    reasoning_effort: Any = accepts()
    verbosity: Any = accepts()
    web_search_options: Any = accepts()

    def max_new_tokens(self) -> int | None:
        """`max_completion_tokens` supersedes `max_tokens`; None: up to the context length."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("tools", "functions"):
            if getattr(self, name) is not None:
                raise unsupported(name, "tool calling is not supported")
        for name in ("tool_choice", "function_call"):
            value = getattr(self, name)
            if value is not None and value != "none":
                raise unsupported(name, "tool calling is not supported; only 'none' is accepted")
        if self.parallel_tool_calls is not None:
            raise unsupported("parallel_tool_calls", "tool calling is not supported")
        fmt = self.response_format
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text" and len(fmt) == 1):
            raise unsupported("response_format", "structured output is not supported; only {'type': 'text'}")
        if self.modalities is not None and self.modalities != ["text"]:
            raise unsupported("modalities", "only ['text'] is supported")
        if self.service_tier not in (None, "auto", "default"):
            raise unsupported("service_tier", "only 'auto' and 'default' are supported")
        if self.store not in (None, False):
            raise unsupported("store", "completions are not stored")
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                raise unsupported(name)
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        check_messages(self.messages)


# ---- tokenizer endpoints ---------------------------------------------------------------------------------
class TokenizeRequest(StrictModel):
    model: str | None = Field(default=None, max_length=MAX_MODEL_NAME)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # prompt: default True; messages: default False (template's BOS)
    add_generation_prompt: bool | None = None  # messages only; default True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = Field(default=None, max_length=MAX_MODEL_NAME)
    tokens: list[int]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- contexts --------------------------------------------------------------------------------------------
DEFAULT_CONTEXT_TTL = 3600.0
MAX_CONTEXT_TTL = 7 * 24 * 3600.0  # a pinned context holds KV memory; a forgotten one must not do so forever


class ScaleRequest(StrictModel):
    """POST /v1/cluster/scale: run `tes` task executors in `model`'s `role` group (surplus ones drain, then
    stop). A group may go to 0 while the model keeps a colocated TE or a prefill and a decode TE."""

    model: str = Field(max_length=MAX_MODEL_NAME)
    tes: int = Field(ge=0, le=64)
    role: Literal["colocated", "prefill", "decode"] = "colocated"


class ContextCreateRequest(StrictModel):
    model: str = Field(max_length=MAX_MODEL_NAME)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | list[int] | None = None
    ttl_seconds: float | None = Field(default=None, gt=0, le=MAX_CONTEXT_TTL)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(_is_int(x) for x in value):
            return value
        raise ValueError("must be a string or a non-empty list of token ids")

    @property
    def ttl(self) -> float:
        return DEFAULT_CONTEXT_TTL if self.ttl_seconds is None else self.ttl_seconds

    def check_supported(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise invalid("Give exactly one of 'messages' or 'prompt'.", param="messages")
        if self.messages is not None:
            check_messages(self.messages)


class ContextObject(BaseModel):
    id: str
    object: Literal["context"] = "context"
    model: str
    tokens: int
    created: int
    expires_at: int


class ContextDeleted(BaseModel):
    id: str
    object: Literal["context.deleted"] = "context.deleted"
    deleted: bool = True


# ---- responses -------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # only the keys that changed: {"role": ...}, {"content": ...} or {}
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepflow"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
