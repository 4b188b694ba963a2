"""Context caching end to end: a real `deepflow serve` (float32, greedy) pins a context's KV and requests that
name it answer exactly as the same prompt sent whole; plus the context lifecycle, the pinned-token cap
(`--max-context-tokens`), cache salts and `/reset_prefix_cache`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.api.server_utils import ServerProcess, smollm2_args, start_server, stop_cleanly

MAX_CONTEXT_TOKENS = 512
SYSTEM = {
    "role": "system",
    "content": (
        "You are the front-desk assistant of the Lighthouse Bakery in Harbour Street. Answer customers "
        "briefly and only from the facts below.\n"
        "Opening hours: Monday to Friday 7:00 to 18:00, Saturday 8:00 to 16:00, Sunday 9:00 to 13:00; closed "
        "on public holidays. The bakery sells sourdough loaves (rye, spelt, white), croissants, cinnamon "
        "rolls, lemon tarts and a daily soup. Sourdough is baked at 5:00 every morning and usually sells out "
        "by noon on Saturdays. Custom birthday cakes need three days' notice and a deposit of 20 euros; they "
        "come in chocolate, vanilla and carrot. Gluten-free bread is available on Tuesdays and Fridays only. "
        "Payment is accepted in cash or by card; there is no minimum amount for cards. Dogs are welcome on "
        "the terrace but not inside. Orders for more than twenty items must be placed by phone the day "
        "before. Leftover bread is donated to the harbour shelter every evening. The owner is Marta Velde, "
        "who founded the bakery in 1998. Parking is available behind the building for fifteen minutes free "
        "of charge. There are two tables inside and six on the terrace. Coffee comes from a roaster in the "
        "next town, and oat milk is free. The bakery runs a bread class on the first Sunday of each month at "
        "14:00 for 35 euros."
    ),
}
QUESTION = [{"role": "user", "content": "When does the bakery open on Sundays?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    """Its own server: a pinned-token cap small enough to hit, big enough for SYSTEM (325 tokens). Pins never
    take the room of one max-length request, so the context is shorter than the KV pool (1,456 tokens)."""
    srv = start_server(
        [
            *smollm2_args(smollm2_dir),
            "--max-context-tokens",
            str(MAX_CONTEXT_TOKENS),
            "--max-model-len",
            "768",
        ]
    )
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def context(http: httpx.Client, server: ServerProcess) -> dict[str, Any]:
    response = http.post(
        "/v1/contexts", json={"model": server.model, "messages": [SYSTEM], "ttl_seconds": 600}
    )
    assert response.status_code == 200, response.text
    return response.json()


def error_code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["code"]


def ask(client: OpenAI, server: ServerProcess, messages: list[dict[str, str]], **extra_body: Any) -> Any:
    return client.chat.completions.create(
        model=server.model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        extra_body=extra_body,
    )


def test_context_object(context: dict[str, Any], http: httpx.Client, server: ServerProcess) -> None:
    assert context["id"].startswith("ctx-") and context["object"] == "context"
    assert context["model"] == server.model and 300 < context["tokens"] < MAX_CONTEXT_TOKENS
    # Both from one clock reading: exactly the TTL, however long the prefill took.
    assert context["expires_at"] - context["created"] == 600
    assert http.get(f"/v1/contexts/{context['id']}").json() == context
    assert error_code(httpx.get(f"{server.url}/v1/contexts/{context['id']}"), 401) == "invalid_api_key"


def test_chat_with_context_matches_the_whole_prompt(
    client: OpenAI, context: dict[str, Any], server: ServerProcess
) -> None:
    with_context = ask(client, server, QUESTION, context_id=context["id"])
    # A salt nobody used before: computed from scratch, so the comparison is cached KV vs fresh KV.
    whole = ask(client, server, [SYSTEM, *QUESTION], cache_salt=f"fresh-{time.time_ns()}")
    assert with_context.choices[0].message.content == whole.choices[0].message.content
    assert with_context.usage.prompt_tokens == whole.usage.prompt_tokens
    cached = with_context.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= context["tokens"] < with_context.usage.prompt_tokens
    assert whole.usage.prompt_tokens_details.cached_tokens == 0

    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"context_id": context["id"]},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == with_context.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_completion_with_prompt_context(client: OpenAI, http: httpx.Client, server: ServerProcess) -> None:
    def tokens(text: str) -> list[int]:
        return http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    # Small enough to be pinned next to `context` under the cap.
    document = tokens(SYSTEM["content"].split("Custom birthday")[0])
    assert len(document) < MAX_CONTEXT_TOKENS - 330
    own = tokens("\nQuestion: Who owns the bakery?\nAnswer:")
    created = http.post("/v1/contexts", json={"model": server.model, "prompt": document, "ttl_seconds": 60})
    assert created.status_code == 200, created.text
    context_id = created.json()["id"]
    args: dict[str, Any] = dict(model=server.model, max_tokens=8, temperature=0)
    with_context = client.completions.create(prompt=own, extra_body={"context_id": context_id}, **args)
    fresh = {"cache_salt": f"fresh-{time.time_ns()}"}
    whole = client.completions.create(prompt=document + own, extra_body=fresh, **args)
    assert with_context.choices[0].text == whole.choices[0].text
    assert with_context.usage is not None and with_context.usage.prompt_tokens == len(document) + len(own)
    assert with_context.usage.prompt_tokens_details.cached_tokens > 0
    assert http.delete(f"/v1/contexts/{context_id}").status_code == 200


def test_lifecycle(http: httpx.Client, server: ServerProcess) -> None:
    created = http.post("/v1/contexts", json={"model": server.model, "prompt": "Short-lived context."})
    context_id = created.json()["id"]
    assert http.get(f"/v1/contexts/{context_id}").status_code == 200
    deleted = http.delete(f"/v1/contexts/{context_id}")
    assert deleted.json() == {"id": context_id, "object": "context.deleted", "deleted": True}
    assert error_code(http.get(f"/v1/contexts/{context_id}"), 404) == "context_not_found"
    assert error_code(http.delete(f"/v1/contexts/{context_id}"), 404) == "context_not_found"
    chat = {"model": server.model, "messages": QUESTION, "max_tokens": 2, "context_id": context_id}
    assert error_code(http.post("/v1/chat/completions", json=chat), 404) == "context_not_found"

    expiring = http.post(
        "/v1/contexts", json={"model": server.model, "prompt": "Gone soon.", "ttl_seconds": 1}
    ).json()
    assert expiring["expires_at"] - expiring["created"] == 1
    # It goes once its TTL is over: polled (the exact moment is for the unit test's injected clock); the bound
    # on polls only turns a context that never expires into a failure instead of a hang.
    for _ in range(1200):
        response = http.get(f"/v1/contexts/{expiring['id']}")
        if response.status_code != 200:
            break
        time.sleep(0.05)
    assert error_code(response, 404) == "context_not_found"


def test_pinned_token_cap_is_429(http: httpx.Client, server: ServerProcess) -> None:
    max_model_len = http.get(f"/v1/models/{server.model}").json()["max_model_len"]
    n = MAX_CONTEXT_TOKENS + 100
    assert n < max_model_len
    response = http.post("/v1/contexts", json={"model": server.model, "prompt": [42] * n})
    assert error_code(response, 429) == "context_limit_exceeded"
    assert "--max-context-tokens" in response.json()["error"]["message"]


def test_context_is_bound_to_its_salt(http: httpx.Client, server: ServerProcess) -> None:
    """Through a real server: another salt (or none) cannot use, see or delete a salted context, exactly as
    for an id never made; its own salt (in the body, or the x-cache-salt header for GET/DELETE) can."""
    body = {"model": server.model, "prompt": "Tenant A's notes.", "cache_salt": "tenant-a"}
    context_id = http.post("/v1/contexts", json=body).json()["id"]
    chat = {"model": server.model, "messages": QUESTION, "max_tokens": 2, "context_id": context_id}
    for other in ({}, {"cache_salt": "tenant-b"}):
        response = http.post("/v1/chat/completions", json={**chat, **other})
        assert error_code(response, 404) == "context_not_found"
    for headers in ({}, {"x-cache-salt": "tenant-b"}):
        assert error_code(http.get(f"/v1/contexts/{context_id}", headers=headers), 404) == "context_not_found"
        assert error_code(http.delete(f"/v1/contexts/{context_id}", headers=headers), 404) == (
            "context_not_found"
        )
    own = {"x-cache-salt": "tenant-a"}
    assert http.post("/v1/chat/completions", json={**chat, "cache_salt": "tenant-a"}).status_code == 200
    assert http.get(f"/v1/contexts/{context_id}", headers=own).json()["id"] == context_id
    assert http.delete(f"/v1/contexts/{context_id}", headers=own).json()["deleted"] is True


def test_reset_prefix_cache_keeps_pinned_contexts(
    client: OpenAI, http: httpx.Client, context: dict[str, Any], server: ServerProcess
) -> None:
    assert error_code(httpx.post(f"{server.url}/reset_prefix_cache"), 401) == "invalid_api_key"
    response = http.post("/reset_prefix_cache")
    assert response.status_code == 200 and response.json() == {"reset": True}
    # Only unpinned blocks go: the context still serves its prefix.
    again = ask(client, server, QUESTION, context_id=context["id"])
    assert again.usage.prompt_tokens_details.cached_tokens > 0
