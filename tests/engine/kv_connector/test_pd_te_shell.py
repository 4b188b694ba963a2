"""Two TE shells (a prefill TE and a decode TE, each serving its engine over its ROUTER socket) and this test
as the job executor: Hello, AddRequest(KVConsume) to D, its KVSink into AddRequest(KVProduce) to P, P's
first token as KVPrefilled to D. The output is HF's, token for token; no block stays held on either TE."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import zmq

from deepflow.engine.core_client import AddRequest
from deepflow.engine.kv_transfer import KVConsume, KVMode, KVPrefilled, KVProduce
from deepflow.engine.request import EngineCoreOutputs, EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform import messages as m
from deepflow.platform.te.shell import TEShell
from tests.engine.kv_connector.conftest import engine_config
from tests.engine.test_hf_equivalence import hf_greedy, random_prompts

pytestmark = pytest.mark.slow  # engines on real models: `make test-fast` leaves this module out


MAX_NEW = 6
RECV_TIMEOUT_MS = 60_000  # a hang guard per message


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from tests.conftest import make_tiny_model

    return make_tiny_model("llama-untied-mha", tmp_path_factory.mktemp("pd-te"))


def test_pd_through_two_te_shells(folder: Path, tmp_path: Path) -> None:
    context = zmq.Context()
    cm = context.socket(zmq.ROUTER)  # a cluster manager that only listens: the shells' heartbeats land here
    cm_address = f"ipc://{tmp_path}/cm"
    cm.bind(cm_address)
    shells, threads, sockets = [], [], []
    try:
        for name in ("te-p0", "te-d0"):
            shell = TEShell(
                name,
                1,
                "tiny",
                engine_config(folder, max_num_batched_tokens=8),
                cm_address,
                f"ipc://{tmp_path}/{name}",
            )
            assert shell.core.kv_worker is not None and shell.core.kv_worker.identity.te_id == name
            shells.append(shell)
            thread = threading.Thread(target=shell.serve, daemon=True)
            thread.start()
            threads.append(thread)
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(shell.info.address)
            sock.send(m.encoder.encode(m.Hello(je_id="je-test", incarnation=1)))
            sockets.append(sock)
        p_sock, d_sock = sockets
        prompts = random_prompts(4, 512, seed=9, min_len=5, max_len=30)
        expected = hf_greedy(folder, prompts, MAX_NEW)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        for mode in KVMode:
            tokens: dict[str, list[int]] = {f"{mode}{i}": [] for i in range(len(prompts))}
            p_done: set[str] = set()
            d_done: set[str] = set()
            for i, prompt in enumerate(prompts):
                request = EngineCoreRequest(
                    request_id=f"{mode}{i}",
                    prompt_token_ids=prompt,
                    sampling_params=params,
                    kv_transfer=KVConsume(mode=mode),
                )
                d_sock.send(m.encoder.encode(AddRequest(request)))
            poller = zmq.Poller()
            poller.register(p_sock, zmq.POLLIN)
            poller.register(d_sock, zmq.POLLIN)
            while len(p_done) < len(prompts) or len(d_done) < len(prompts):
                ready = dict(poller.poll(RECV_TIMEOUT_MS))
                assert ready, "no output from either TE"
                for sock in ready:
                    batch = m.te_to_je.decode(sock.recv())
                    assert isinstance(batch, EngineCoreOutputs), batch
                    for out in batch.outputs:
                        rid = out.request_id
                        if sock is d_sock and out.kv_sink is not None:
                            prompt = prompts[int(rid[len(str(mode)) :])]
                            produce = KVProduce(sink=out.kv_sink, mode=mode)
                            request = EngineCoreRequest(
                                request_id=rid,
                                prompt_token_ids=prompt,
                                sampling_params=params,
                                kv_transfer=produce,
                            )
                            p_sock.send(m.encoder.encode(AddRequest(request)))
                        elif sock is p_sock:
                            if out.new_token_ids:
                                tokens[rid][:0] = out.new_token_ids
                                first = KVPrefilled(request_id=rid, first_token_id=out.new_token_ids[0])
                                d_sock.send(m.encoder.encode(first))
                            if out.finish_reason is not None:
                                assert out.kv_transferred, out
                                p_done.add(rid)
                        else:
                            tokens[rid].extend(out.new_token_ids)
                            if out.finish_reason is not None:
                                assert out.error_type is None, out
                                d_done.add(rid)
            assert [tokens[f"{mode}{i}"] for i in range(len(prompts))] == expected, mode
    finally:
        for shell in shells:
            shell.stop()
        for thread in threads:
            thread.join(30)
        for sock in sockets:
            sock.close()
        cm.close(linger=0)
        context.term()
    for shell in shells:
        assert not shell.core.cache.owners() and not shell.core.scheduler.requests
