"""The platform end to end: `deepflow serve --tes 2` starts a cluster manager, a job executor and two real
TEs (SmolLM2, float32). Requests sharing a prefix follow the TE that caches it while load is balanced; under
skewed load the combined policy spreads them; a killed TE loses no request that had not streamed and comes
back under a new incarnation, known to the JE within a second; killing the CM or the JE loses no TE."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server_utils import AUTH, ServerProcess, smollm2_args, start_server, wait_for

SYSTEM = "You are a terse assistant for a ferry company. Boats leave hourly from pier two, 6:00 to 22:00."


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def chat(model: str, question: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def cluster(http: httpx.Client) -> dict[str, Any]:
    reply = http.get("/v1/cluster")
    assert reply.status_code == 200, reply.text
    return reply.json()


def final_job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's record once it is final. Another JE than the one that ran it may answer, from the store
    the JEs flush to every 100 ms: wait for the record to catch up (the bound guards hangs only)."""
    record: dict[str, Any] = {}

    def final() -> bool:
        nonlocal record
        reply = http.get(f"/v1/jobs/{job_id}")
        record = reply.json() if reply.status_code == 200 else {}
        return record.get("state") in ("finished", "failed", "aborted")

    assert wait_for(final, 30, 0.05), record
    return record


def te_pids(report: dict[str, Any]) -> dict[str, int]:
    return {te["te_id"]: te["pid"] for te in report["tes"]}


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    # --max-model-len below the pool: room for a pinned context (contexts never take a full request's room)
    args = [*smollm2_args(smollm2_dir), "--tes", "2", "--policy", "combined", "--max-model-len", "1024"]
    server = start_server(args)
    try:
        # Ready means every model has a TE; the tests here want both TEs of the group.
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
            assert wait_for(lambda: all(te["state"] == "ready" for te in cluster(http)["tes"]), 120)
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


def test_cluster_report_and_jobs(server: ServerProcess, http: httpx.Client) -> None:
    report = cluster(http)
    assert [te["state"] for te in report["tes"]] == ["ready", "ready"]
    assert report["groups"][0]["model"] == server.model and report["groups"][0]["ready"] == 2
    assert set(report["job_executor"]["connected_tes"]) == {"te-0", "te-1"}
    reply = http.post("/v1/chat/completions", json=chat(server.model, "Which pier?"))
    assert reply.status_code == 200, reply.text
    te = reply.headers["x-deepflow-te"]
    job = final_job(http, reply.json()["id"])
    assert job["state"] == "finished" and job["model"] == server.model
    (task,) = job["tasks"]
    assert task["te_id"] == te and [a["te_id"] for a in task["attempts"]] == [te]
    assert [s for s, _ in task["history"]] == ["created", "queued", "scheduled", "running", "finished"]
    assert http.get("/v1/jobs/chatcmpl-unknown").status_code == 404
    assert httpx.get(f"{server.url}/v1/cluster").status_code == 401  # admin: needs the key


def test_same_prefix_follows_its_te_then_spreads_under_skew(
    server: ServerProcess, http: httpx.Client
) -> None:
    # Balanced (one request at a time): every turn goes where the system prompt is cached.
    tes, cached = [], []
    for question in ("When is the first boat?", "When is the last boat?", "Is there a boat at noon?"):
        reply = http.post("/v1/chat/completions", json=chat(server.model, question))
        assert reply.status_code == 200, reply.text
        tes.append(reply.headers["x-deepflow-te"])
        cached.append(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(set(tes)) == 1, tes
    assert min(cached[1:]) >= 16, cached
    # Skewed: long generations pile up on that TE; past the imbalance threshold new ones go to the other.
    with contextlib.ExitStack() as streams:
        routed = []
        for i in range(10):
            body = chat(server.model, f"Tell me a long story number {i}.", 400, stream=True, ignore_eos=True)
            response = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
            assert response.status_code == 200
            routed.append(response.headers["x-deepflow-te"])
    assert routed[0] == tes[0], routed  # still balanced: locality
    assert len(set(routed)) == 2, routed  # imbalance: the load-aware branch used the other TE


def _stream_chat(url: str, body: dict[str, Any], results: dict[str, Any], key: int) -> None:
    """Read one SSE stream to its end: (job id, content chunks seen, error event or None)."""
    job_id, contents, error = None, 0, None
    with (
        httpx.Client(base_url=url, headers=AUTH, timeout=300) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            job_id = event["id"]
            contents += any(c["delta"].get("content") for c in event["choices"])
    results[key] = (job_id, contents, error)


def test_killed_te_loses_no_unstreamed_request_and_comes_back(
    server: ServerProcess, http: httpx.Client
) -> None:
    before = cluster(http)
    results: dict[int, Any] = {}
    # 2 TEs x max-num-seqs 4: 12 requests leave some waiting (not streamed) when one TE is killed.
    threads = [
        threading.Thread(
            target=_stream_chat,
            args=(
                server.url,
                chat(server.model, f"Count to {i + 20}.", 48, stream=True, ignore_eos=True),
                results,
                i,
            ),
        )
        for i in range(12)
    ]
    # Non-streaming requests show nothing before the end: whatever their TE produced, they start over.
    whole: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as client:
            body = chat(server.model, f"Spell {i + 3} words.", 48, ignore_eos=True)
            whole[i] = client.post("/v1/chat/completions", json=body)

    asking = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in asking:  # first, so they are decoding on both TEs when one is killed
        thread.start()

    def decoding() -> bool:
        # All 4 running and prefilled, with a few tokens produced: what they still owe is below 4 x 45
        # (outstanding = prompt tokens not yet prefilled + output tokens not yet generated).
        loads = [te["load"] for te in cluster(http)["tes"] if te["load"]]
        running = sum(load["running"] for load in loads)
        return running >= 4 and sum(load["outstanding_tokens"] for load in loads) <= running * 45

    assert wait_for(decoding, 60, 0.05)
    for thread in threads:
        thread.start()
    threads += asking
    assert wait_for(
        lambda: any(te["load"] and te["load"]["waiting"] for te in cluster(http)["tes"]), 60, 0.05
    )
    victim = max(cluster(http)["tes"], key=lambda te: te["load"]["waiting"])
    os.kill(victim["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 12 and len(whole) == 4
    attempts = []
    for job_id, contents, error in results.values():
        job = final_job(http, job_id)
        (task,) = job["tasks"]
        attempts.append([a["te_id"] for a in task["attempts"]])
        if error is not None:  # only a request whose tokens had reached the client may fail
            assert task["streamed"] and contents >= 1, (job, error)
            assert victim["te_id"] in error["message"]
            assert job["state"] == "failed"
        else:
            assert job["state"] == "finished", job
    for reply in whole.values():  # every non-streaming request completed, retried or not
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 48
    retried = [a for a in attempts if len(a) == 2]
    assert retried and all(a[0] == victim["te_id"] and a[1] != victim["te_id"] for a in retried), attempts

    # The cluster manager restarts the TE; the JE connects to the new incarnation within a second.
    def back() -> bool:
        te = next(t for t in cluster(http)["tes"] if t["te_id"] == victim["te_id"])
        return te["state"] == "ready" and te["incarnation"] == victim["incarnation"] + 1

    assert wait_for(back, 120, 0.1)

    def pushed() -> bool:  # the JE answering holds the CM's latest view, with the new incarnation in it
        report = cluster(http)
        return (
            report["job_executor"]["view_version"] == report["cluster_manager"]["view_version"]
            and victim["te_id"] in report["job_executor"]["connected_tes"]
        )

    assert wait_for(pushed, 60, 0.05)  # a bound against hangs only
    report = cluster(http)
    te = next(t for t in report["tes"] if t["te_id"] == victim["te_id"])
    known = report["job_executor"]["connected_tes"][victim["te_id"]]
    assert known["incarnation"] == te["incarnation"] and te["pid"] != victim["pid"] and te["restarts"] == 1
    # Connected once the CM had it ready (its push), never to the new incarnation before.
    assert known["known_at"] >= te["ready_at"], (known, te)
    other = next(t for t in before["tes"] if t["te_id"] != victim["te_id"])
    assert te_pids(report)[other["te_id"]] == other["pid"]  # the other TE was never touched


def test_cm_and_je_restarts_lose_no_te(server: ServerProcess, http: httpx.Client) -> None:
    assert wait_for(lambda: all(te["state"] == "ready" for te in cluster(http)["tes"]), 120)
    before = cluster(http)
    pids = te_pids(before)
    os.kill(before["cluster_manager"]["pid"], signal.SIGKILL)

    def new_cm() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            report = http.get("/v1/cluster").json()
            return report.get("cluster_manager", {}).get("pid") not in (
                None,
                before["cluster_manager"]["pid"],
            )
        return False

    assert wait_for(new_cm, 60)
    assert wait_for(lambda: all(te["state"] == "ready" for te in cluster(http)["tes"]), 30)
    assert te_pids(cluster(http)) == pids  # adopted, not restarted
    # What a JE made outlives it: a finished job and a pinned context (both in SQLite files the JEs share;
    # the context's KV stays pinned on its TE).
    job_id = http.post("/v1/chat/completions", json=chat(server.model, "Which pier?")).json()["id"]
    context = {"model": server.model, "messages": [{"role": "system", "content": SYSTEM * 4}]}
    made = http.post("/v1/contexts", json={**context, "ttl_seconds": 600})
    assert made.status_code == 200, made.text
    context_id, context_tokens = made.json()["id"], made.json()["tokens"]

    def pinned() -> int:
        return sum(te["pinned_context_tokens"] or 0 for te in cluster(http)["tes"])

    assert wait_for(lambda: pinned() > 0, 10)
    assert wait_for(lambda: len(cluster(http)["job_executors"]) >= 2, 120)  # both JEs (the default) serve
    killed = before["job_executor"]["je_id"]
    os.kill(before["job_executor"]["pid"], signal.SIGKILL)
    # The other JE serves at once: the first request after the kill is its, not the restarted one's.
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as fresh:  # no pooled connection
        first = fresh.post("/v1/chat/completions", json=chat(server.model, "Which pier?"))
    assert first.status_code == 200, first.text
    assert final_job(http, first.json()["id"])["job_executor"] != killed

    def served() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return (
                http.post("/v1/chat/completions", json=chat(server.model, "Which pier?")).status_code == 200
            )
        return False

    assert wait_for(served, 120)
    after = cluster(http)
    assert after["job_executor"]["pid"] != before["job_executor"]["pid"]
    assert te_pids(after) == pids and all(alive(pid) for pid in pids.values())
    job = http.get(f"/v1/jobs/{job_id}")
    assert job.status_code == 200 and job.json()["state"] == "finished", job.text
    assert http.get(f"/v1/contexts/{context_id}").status_code == 200 and pinned() > 0
    # The new JE never saw the context made: the prompt tree (the TEs' residency snapshot) routes to its TE.
    reply = http.post(
        "/v1/chat/completions", json={**chat(server.model, "Which pier?"), "messages": [
            {"role": "user", "content": "Which pier?"}], "context_id": context_id}
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= context_tokens - 16
    assert http.delete(f"/v1/contexts/{context_id}").status_code == 200
    assert wait_for(lambda: pinned() == 0, 10)  # unpinned on its TE, though this JE never knew where it was


def test_scaling_up_then_down_drains_without_losing_a_request(
    server: ServerProcess, http: httpx.Client
) -> None:
    assert wait_for(lambda: all(te["state"] == "ready" for te in cluster(http)["tes"]), 120)

    def scale(tes: int) -> dict[str, Any]:
        reply = http.post("/v1/cluster/scale", json={"model": server.model, "tes": tes})
        assert reply.status_code == 200, reply.text
        return reply.json()

    (added,) = [te["te_id"] for te in scale(3)["tes"] if te["state"] == "starting"]
    assert wait_for(lambda: added in cluster(http)["job_executor"]["connected_tes"], 120)
    # A pinned context: scaling down keeps its TE (te-0, the oldest, pinned nothing before the fix chose it).
    context = {"model": server.model, "messages": [{"role": "system", "content": SYSTEM * 4}]}
    made = http.post("/v1/contexts", json={**context, "ttl_seconds": 600})
    assert made.status_code == 200, made.text
    context_id, context_tokens, holder = made.json()["id"], made.json()["tokens"], made.json()["te"]
    assert holder is not None and http.get(f"/v1/contexts/{context_id}").json()["te"] == holder

    def pins() -> dict[str, int]:
        return {te["te_id"]: te["pinned_context_tokens"] or 0 for te in cluster(http)["tes"]}

    assert wait_for(lambda: pins()[holder] > 0, 30)  # its heartbeat told the CM
    results: dict[int, Any] = {}
    body = chat(server.model, "Tell me about the ferry.", 96, stream=True, ignore_eos=True)
    threads = [threading.Thread(target=_stream_chat, args=(server.url, body, results, i)) for i in range(3)]
    for thread in threads:
        thread.start()
    busy = lambda: sum(te["load"]["running"] for te in cluster(http)["tes"] if te["load"])  # noqa: E731
    assert wait_for(lambda: busy() == 3, 60, 0.05)
    report = scale(1)
    draining = {te["te_id"]: te["pid"] for te in report["tes"] if te["state"] == "draining"}
    assert len(draining) == 2, report["tes"]
    for thread in threads:
        thread.join(timeout=120)
    for job_id, contents, error in results.values():  # the drained TEs finished what they had
        assert error is None and contents >= 1, error
        job = final_job(http, job_id)
        assert job["state"] == "finished" and len(job["tasks"][0]["attempts"]) == 1

    def removed() -> bool:
        states = {te["te_id"]: te["state"] for te in cluster(http)["tes"]}
        return all(states[te_id] == "removed" for te_id in draining)

    assert wait_for(removed, 60) and not any(alive(pid) for pid in draining.values())
    (remaining,) = cluster(http)["groups"][0]["tes"]
    assert remaining == holder and holder not in draining
    for question in ("Which pier?", "When is the last boat?"):
        reply = http.post("/v1/chat/completions", json=chat(server.model, question))
        assert reply.status_code == 200 and reply.headers["x-deepflow-te"] == remaining
    # The context still lives there and is used from there: its tokens are not recomputed.
    assert http.get(f"/v1/contexts/{context_id}").json()["te"] == remaining
    body = {**chat(server.model, "Which pier?"), "messages": [{"role": "user", "content": "Which pier?"}]}
    reply = http.post("/v1/chat/completions", json={**body, "context_id": context_id})
    assert reply.status_code == 200 and reply.headers["x-deepflow-te"] == remaining
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= context_tokens - 16
    assert http.delete(f"/v1/contexts/{context_id}").status_code == 200
    bad = http.post("/v1/cluster/scale", json={"model": "no-such-model", "tes": 2})
    assert bad.status_code == 400 and "unknown model" in bad.json()["error"]["message"]


def test_a_context_whose_te_restarted_is_pinned_again_by_its_first_use(
    server: ServerProcess, http: httpx.Client
) -> None:
    """Recompute on use: a context's TE dies (its pinned KV with it); GET says it lives nowhere; the first
    request naming it pins it again where it runs, and the next one reuses it."""
    assert wait_for(lambda: all(te["state"] in ("ready", "removed") for te in cluster(http)["tes"]), 120)
    context = {"model": server.model, "messages": [{"role": "system", "content": SYSTEM * 4}]}
    made = http.post("/v1/contexts", json={**context, "ttl_seconds": 600})
    assert made.status_code == 200, made.text
    context_id, context_tokens, holder = made.json()["id"], made.json()["tokens"], made.json()["te"]
    victim = next(te for te in cluster(http)["tes"] if te["te_id"] == holder)
    os.kill(victim["pid"], signal.SIGKILL)

    def back() -> bool:
        te = next(t for t in cluster(http)["tes"] if t["te_id"] == holder)
        return te["state"] == "ready" and te["incarnation"] > victim["incarnation"]

    assert wait_for(back, 120, 0.1)
    assert http.get(f"/v1/contexts/{context_id}").json()["te"] is None  # its KV died with that incarnation
    body = {**chat(server.model, "Which pier?"), "messages": [{"role": "user", "content": "Which pier?"}]}
    body["context_id"] = context_id
    replies: list[httpx.Response] = []

    def used() -> bool:  # until every JE knows the new incarnation (a bound against hangs only)
        with contextlib.suppress(httpx.HTTPError):
            replies.append(http.post("/v1/chat/completions", json=body))
            return replies[-1].status_code == 200
        return False

    assert wait_for(used, 60, 0.1), replies[-1].text if replies else "no reply"
    serving = replies[-1].headers["x-deepflow-te"]
    assert http.get(f"/v1/contexts/{context_id}").json()["te"] == serving

    def pinned_on(te_id: str) -> int:
        return next(te["pinned_context_tokens"] or 0 for te in cluster(http)["tes"] if te["te_id"] == te_id)

    assert wait_for(lambda: pinned_on(serving) >= context_tokens - 16, 30)  # pinned, not merely cached
    again = http.post("/v1/chat/completions", json=body)
    assert again.status_code == 200 and again.headers["x-deepflow-te"] == serving
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= context_tokens - 16
    assert http.delete(f"/v1/contexts/{context_id}").status_code == 200
    assert wait_for(lambda: pinned_on(serving) == 0, 30)


def _tiny_model_with_smollm2_tokenizer(smollm2_dir: Path, folder: Path) -> Path:
    """A second, different model that shares SmolLM2's tokenizer (random weights, two layers)."""
    import shutil

    import torch
    import transformers

    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    for item in smollm2_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(item, folder / item.name)
    return folder


def test_two_models_at_once_and_ctrl_c_stops_every_process(smollm2_dir: Path, tmp_path: Path) -> None:
    tiny = _tiny_model_with_smollm2_tokenizer(smollm2_dir, tmp_path / "tiny")
    args = smollm2_args(smollm2_dir)
    args += ["--model", str(tiny), "--served-model-name", "smol", "--served-model-name", "tiny"]
    args += ["--tokenizer-workers", "1"]  # prompts tokenized in a worker process of the JE
    server = start_server(args)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["smol", "tiny"]
            report = cluster(http)
            assert {g["model"]: g["tes"] for g in report["groups"]} == {"smol": ["te-0"], "tiny": ["te-1"]}
            for model, te in (("smol", "te-0"), ("tiny", "te-1")):
                reply = http.post(
                    "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}
                )
                assert reply.status_code == 200, reply.text
                assert reply.headers["x-deepflow-te"] == te and reply.json()["model"] == model
            smol = http.post("/v1/completions", json={"model": "smol", "prompt": "The capital of France is",
                                                      "max_tokens": 3, "temperature": 0})  # fmt: skip
            assert "Paris" in smol.json()["choices"][0]["text"]
            pids = [
                *te_pids(report).values(),
                report["cluster_manager"]["pid"],
                report["job_executor"]["pid"],
            ]
        everything = descendants(server.process.pid)  # the JE's tokenizer worker too
        assert set(pids) <= everything and len(everything) > len(pids), (pids, everything)
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=90) == 0
        assert wait_for(lambda: not any(alive(pid) for pid in everything), 10), (
            "a process outlived the launcher"
        )
        assert "DeepFlow stopped" in server.log
    finally:
        if server.process.poll() is None:
            server.stop()
