"""Prefill/decode disaggregation end to end: `deepflow serve --pd 1:1` starts a prefill TE (te-p0) and a
decode TE (te-d0) of SmolLM2 (float32) and no colocated one. It serves the OpenAI API (completions and chat,
streaming and not: a stream is the prefill TE's first token, then the decode TE's); each request is one job
with a prefill task on te-p0 and a decode task on te-d0; `x-deepflow-te` names both. Killing the decode TE
mid-transfer loses no request that had not streamed: they wait for its restart and run there; the prefill
TE is left holding nothing. The decode group scales on its own."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server_utils import AUTH, ServerProcess, smollm2_args, start_server, wait_for
from tests.platform.test_platform_e2e import _stream_chat, chat, cluster, final_job

PAIR = "te-p0,te-d0"


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    args = [*smollm2_args(smollm2_dir), "--pd", "1:1", "--max-model-len", "1024"]
    args[args.index("--kv-cache-memory") + 1] = "128MiB"  # room for a few 600-token prompts on either side
    server = start_server(args)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
            assert wait_for(lambda: all(te["state"] == "ready" for te in cluster(http)["tes"]), 120)
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
        yield client


def sse_text(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """A stream read to its end: (its text, the response id, headers)."""
    import json

    text, response_id = "", ""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        headers = dict(response.headers)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            response_id = event["id"]
            for choice in event["choices"]:
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text, response_id, headers


def test_the_openai_api_through_a_prefill_and_a_decode_te(server: ServerProcess, http: httpx.Client) -> None:
    report = cluster(http)
    assert sorted((te["te_id"], te["role"]) for te in report["tes"]) == [
        ("te-d0", "decode"),
        ("te-p0", "prefill"),
    ]
    assert sorted(g["role"] for g in report["groups"]) == ["decode", "prefill"]
    body = chat(server.model, "Which pier do the boats leave from?", 24)
    whole = http.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-deepflow-te"] == PAIR
    answer = whole.json()
    assert answer["usage"]["completion_tokens"] >= 2  # a token from each side at least
    # Greedy float32: the stream (P's first token, then D's) is the same text as the whole answer.
    streamed, _, headers = sse_text(http, "/v1/chat/completions", body)
    assert headers["x-deepflow-te"] == PAIR
    assert streamed == answer["choices"][0]["message"]["content"]

    completion = {"model": server.model, "prompt": "The ferry leaves at", "max_tokens": 12, "temperature": 0}
    plain = http.post("/v1/completions", json=completion)
    assert plain.status_code == 200 and plain.headers["x-deepflow-te"] == PAIR
    text, _, _ = sse_text(http, "/v1/completions", completion)
    assert text == plain.json()["choices"][0]["text"] and plain.json()["usage"]["completion_tokens"] == 12
    # Bad input is still the client's 4xx, before any TE sees it.
    bad = http.post("/v1/completions", json={**completion, "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_a_job_has_a_prefill_task_and_a_decode_task(server: ServerProcess, http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json=chat(server.model, "When is the last boat?"))
    assert reply.status_code == 200, reply.text
    job = final_job(http, reply.json()["id"])
    assert job["state"] == "finished"
    prefill, decode = job["tasks"]
    assert (prefill["kind"], prefill["te_id"], prefill["state"]) == ("prefill", "te-p0", "finished")
    assert (decode["kind"], decode["te_id"], decode["state"]) == ("decode", "te-d0", "finished")
    for task in (prefill, decode):
        assert [s for s, _ in task["history"]] == ["created", "queued", "scheduled", "running", "finished"]
        assert len(task["attempts"]) == 1 and task["streamed"]
    routing = cluster(http)["job_executor"]["routing"][server.model]
    assert routing["modes"].get("disaggregated/only_disaggregated", 0) >= 1
    assert any(r["tes"].keys() == {"prefill", "decode"} for r in routing["recent"])


def test_killing_the_decode_te_mid_transfer_loses_no_request_that_had_not_streamed(
    server: ServerProcess, http: httpx.Client
) -> None:
    before = {te["te_id"]: te for te in cluster(http)["tes"]}
    long_question = "List every departure. " * 60  # ~500 tokens of prompt: the prefill takes a while
    results: dict[int, Any] = {}
    streams = [
        threading.Thread(
            target=_stream_chat,
            args=(
                server.url,
                chat(server.model, f"{i}. {long_question}", 32, stream=True, ignore_eos=True),
                results,
                i,
            ),
        )
        for i in range(6)
    ]
    whole: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
            body = chat(server.model, f"{i} again. {long_question}", 32, ignore_eos=True)
            whole[i] = client.post("/v1/chat/completions", json=body)

    asking = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    threads = streams + asking
    for thread in threads:
        thread.start()

    def prefilling() -> bool:  # P has work: those requests hold blocks on both sides (D reserved first)
        p = next(te for te in cluster(http)["tes"] if te["te_id"] == "te-p0")
        return bool(p["load"]) and p["load"]["running"] + p["load"]["waiting"] >= 2

    assert wait_for(prefilling, 120, 0.02)
    os.kill(before["te-d0"]["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 6 and len(whole) == 3
    retried = 0
    for job_id, contents, error in results.values():
        job = final_job(http, job_id)
        prefill, decode = (t for t in job["tasks"] if t["kind"] in ("prefill", "decode"))
        retried += len(decode["attempts"]) > 1
        if error is not None:  # only a request whose first token had reached the client may fail
            assert contents >= 1 and prefill["streamed"], (job, error)
            assert "te-d0" in error["message"] and job["state"] == "failed"
        else:
            assert job["state"] == "finished", job
    for reply in whole.values():  # every non-streaming request completed, retried or not
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 32
    assert retried or any(
        len(final_job(http, r.json()["id"])["tasks"][1]["attempts"]) > 1 for r in whole.values()
    )

    # te-d0 came back as a new incarnation; te-p0 was never touched and holds no request any more.
    def settled() -> bool:
        tes = {te["te_id"]: te for te in cluster(http)["tes"]}
        d, p = tes["te-d0"], tes["te-p0"]
        return (
            d["state"] == "ready"
            and d["incarnation"] == before["te-d0"]["incarnation"] + 1
            and p["pid"] == before["te-p0"]["pid"]
            and bool(p["load"])
            # nothing running or waiting, no transfer in flight, no block held for a decode TE (each is
            # bounded: the lease, the quarantine)
            and sum(p["load"].get(k, 0) for k in ("running", "waiting", "kv_sending", "kv_held")) == 0
        )

    assert wait_for(settled, 180, 0.2)
    reply = http.post("/v1/chat/completions", json=chat(server.model, "Which pier?"))
    assert reply.status_code == 200 and reply.headers["x-deepflow-te"] == PAIR


def test_the_decode_group_scales_on_its_own(server: ServerProcess, http: httpx.Client) -> None:
    def scale(role: str, tes: int) -> httpx.Response:
        return http.post("/v1/cluster/scale", json={"model": server.model, "role": role, "tes": tes})

    refused = scale("prefill", 0)  # the model would have no prefill TE and no colocated one
    assert refused.status_code == 400 and "way to serve" in refused.json()["error"]["message"]
    reply = scale("decode", 2)
    assert reply.status_code == 200, reply.text
    (added,) = [te for te in reply.json()["tes"] if te["state"] == "starting"]
    assert added["te_id"] == "te-d1" and added["role"] == "decode"
    assert wait_for(lambda: "te-d1" in cluster(http)["job_executor"]["connected_tes"], 180)
    seen = set()
    for i in range(4):  # round robin... or load: either way both decode TEs can be chosen
        reply = http.post("/v1/chat/completions", json=chat(server.model, f"Question {i}?", 4))
        assert reply.status_code == 200
        seen.add(reply.headers["x-deepflow-te"])
    assert seen <= {"te-p0,te-d0", "te-p0,te-d1"}
    reply = scale("decode", 1)
    assert reply.status_code == 200
    assert wait_for(
        lambda: sum(te["state"] == "removed" for te in cluster(http)["tes"] if te["role"] == "decode") == 1,
        60,
    )


def test_colocated_and_disaggregated_side_by_side(smollm2_dir: Path) -> None:
    """`--tes 1 --pd 1:1`: one model, a colocated group beside the P/D pair; the router splits per request
    (here alternating) and each job's tasks say which way it went."""
    args = [*smollm2_args(smollm2_dir), "--tes", "1", "--pd", "1:1", "--jes", "1"]
    server = start_server([*args, "--router-param", "prefer=alternate"])
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as http:
            assert wait_for(lambda: all(te["state"] == "ready" for te in cluster(http)["tes"]), 180)
            served: dict[str, list[str]] = {}
            for i in range(4):
                reply = http.post(
                    "/v1/chat/completions", json=chat(server.model, f"Question {i}: which pier?")
                )
                assert reply.status_code == 200, reply.text
                job = final_job(http, reply.json()["id"])
                served.setdefault(reply.headers["x-deepflow-te"], []).append(
                    "+".join(t["kind"] for t in job["tasks"])
                )
            assert served == {"te-0": ["colocated"] * 2, PAIR: ["prefill+decode"] * 2}, served
            routing = cluster(http)["job_executor"]["routing"][server.model]
            assert routing["modes"] == {"colocated/alternate": 2, "disaggregated/alternate": 2}
    finally:
        server.stop()
