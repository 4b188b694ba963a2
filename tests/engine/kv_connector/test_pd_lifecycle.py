"""The bounded waits and the frees of disaggregated requests, with the schedulers' clock injected: a prefill
TE's lease, a decode TE's timeout and quarantine, aborts both ways, a peer that goes away. Nothing here
asserts on wall-clock time; the tests wait on the engines' own progress (bounded loops)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deepflow.engine.kv_connector.base import CTL_BYTES, CTL_REGION, KV_REGION
from deepflow.engine.kv_transfer import KVConsume, KVMode, KVProduce, KVSink
from deepflow.engine.request import EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from deepflow.flow import KVPoolLayout, TransferAgent, allocate_kv_pool, allocate_shared
from tests.engine.kv_connector.conftest import FakeClock, assert_clean
from tests.engine.kv_connector.pd import PDDriver

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ROUNDS = 20_000


def step_until(cores, cond, outputs=None):  # type: ignore[no-untyped-def]
    for _ in range(ROUNDS):
        if cond():
            return
        for core in cores:
            for out in core.step():
                if outputs is not None:
                    outputs.append(out)
    raise AssertionError("condition never met")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from tests.conftest import make_tiny_model

    return make_tiny_model("llama3-rope-gqa3", tmp_path_factory.mktemp("pd-lifecycle"))


class StallingDecode:
    """A decode side that takes the bytes but holds its acknowledgements until `release` (a peer that has
    stopped answering): a bare DistFlow agent with a pool of the engine's layout."""

    def __init__(self, layout, num_blocks: int) -> None:  # type: ignore[no-untyped-def]
        self.gate = threading.Event()
        self.seen = threading.Event()
        self.pool = allocate_kv_pool(KVPoolLayout(layout=layout, num_blocks=num_blocks))
        self.ctl = allocate_shared(CTL_BYTES)
        self.agent = TransferAgent("stalling-decode", layout, on_receive=self._on_receive)
        self.agent.register(KV_REGION, self.pool.segment)
        self.agent.register(CTL_REGION, self.ctl)

    def _on_receive(self, inbound) -> None:  # type: ignore[no-untyped-def]
        self.seen.set()
        self.gate.wait(60.0)  # bounded: a test that forgets to release still ends

    def sink(self, prompt_len: int, block_size: int) -> KVSink:
        n = -(-prompt_len // block_size)
        return KVSink(
            te_id="stalling",
            agent_address=self.agent.address,
            incarnation=self.agent.incarnation,
            block_ids=list(range(n)),
            num_local_tokens=0,
            sink_id="s1",
        )

    def close(self) -> None:
        self.gate.set()
        self.agent.close()
        self.pool.close()
        self.ctl.close()


def test_prefill_lease_expires_but_blocks_stay_until_the_copy_is_done(folder: Path, make_engines) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    (prefill,) = make_engines(folder, 1, clock=clock)
    layout = prefill.runner.kv_worker.pool.layout
    stalling = StallingDecode(layout, 32)
    try:
        prompt = list(range(5, 23))
        produce = KVProduce(sink=stalling.sink(len(prompt), 4), mode=KVMode.BY_REQUEST, lease_s=10.0)
        prefill.add_request(
            EngineCoreRequest(
                request_id="p", prompt_token_ids=prompt, sampling_params=PARAMS, kv_transfer=produce
            )
        )
        outputs: list = []
        step_until([prefill], lambda: any(o.new_token_ids for o in outputs), outputs)
        first = next(o for o in outputs if o.new_token_ids)
        assert first.finish_reason is None  # the first token is streamed before the request ends
        step_until([prefill], stalling.seen.is_set)
        clock.advance(10.5)  # past the lease: the request ends...
        step_until([prefill], lambda: any(o.finish_reason for o in outputs), outputs)
        final = next(o for o in outputs if o.finish_reason)
        assert final.error_type == "kv_transfer" and "lease" in final.stop_reason and not final.kv_transferred
        # ...but the write in flight still reads its blocks: they are not freed (not reusable) yet.
        for _ in range(50):
            prefill.step()
        assert prefill.cache.owners() == ["p"]
        stalling.gate.set()
        step_until([prefill], lambda: not prefill.has_work())
        assert_clean(prefill)
    finally:
        stalling.close()


def test_decode_timeout_quarantine_and_late_bytes(folder: Path, make_engines) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    (decode,) = make_engines(folder, 1, clock=clock, kv_quarantine_s=100.0)
    prompt = list(range(5, 23))
    consume = KVConsume(timeout_s=5.0)
    decode.add_request(
        EngineCoreRequest(
            request_id="d", prompt_token_ids=prompt, sampling_params=PARAMS, kv_transfer=consume
        )
    )
    outputs: list = []
    step_until([decode], lambda: bool(outputs), outputs)
    sink = outputs[0].kv_sink
    assert sink is not None and outputs[0].finish_reason is None and not outputs[0].new_token_ids
    assert len(sink.block_ids) == 5 and sink.num_local_tokens == 0
    for _ in range(20):
        decode.step()
    assert not any(o.new_token_ids for o in outputs)  # never decodes without the KV
    clock.advance(5.5)
    step_until([decode], lambda: any(o.finish_reason for o in outputs), outputs)
    final = next(o for o in outputs if o.finish_reason)
    assert final.error_type == "kv_timeout"
    # Quarantined: a prefill side may still be writing into them; the id stays taken meanwhile.
    assert decode.cache.owners() == ["d"]
    with pytest.raises(ValueError, match="still in use"):
        decode.scheduler.add_request(
            EngineCoreRequest(
                request_id="d", prompt_token_ids=prompt, sampling_params=PARAMS, kv_transfer=consume
            )
        )
    clock.advance(101.0)
    step_until([decode], lambda: not decode.has_work())
    assert_clean(decode)


@pytest.mark.parametrize("mode", list(KVMode))
def test_prefill_abort_mid_transfer_fails_decode_at_once(folder: Path, make_engines, mode: KVMode) -> None:  # type: ignore[no-untyped-def]
    """The prefill side aborted between chunks: its abort notice reaches the decode side (after every byte it
    sent), which ends its request with "kv_transfer" and frees its blocks at once (no quarantine)."""
    clock = FakeClock()
    prefill, decode = make_engines(folder, 2, clock=clock, max_num_batched_tokens=4)
    driver = PDDriver(prefill, decode, mode)
    req = driver.submit("r", list(range(5, 45)), PARAMS)
    driver.run(
        until=lambda: (
            "r" in prefill.scheduler.requests and prefill.scheduler.requests["r"].num_computed_tokens >= 8
        )
    )
    prefill.abort(["r"])  # not through the driver: the decode side must learn it from the prefill side
    driver.run(until=lambda: req.d_final is not None)
    assert req.d_final.error_type == "kv_transfer" and "aborted" in req.d_final.stop_reason
    driver.run(until=lambda: not (prefill.has_work() or decode.has_work()))
    assert_clean(prefill, decode)


def test_decode_lost_fails_the_prefill_request(folder: Path, make_engines) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    prefill, decode = make_engines(folder, 2, clock=clock, max_num_batched_tokens=4)
    driver = PDDriver(prefill, decode, KVMode.BY_LAYER)
    req = driver.submit("r", list(range(5, 45)), PARAMS)
    driver.run(
        until=lambda: (
            "r" in prefill.scheduler.requests and prefill.scheduler.requests["r"].num_computed_tokens >= 8
        )
    )
    decode.shutdown()  # the decode TE is gone: its agent with it
    outputs: list = []
    step_until([prefill], lambda: any(o.finish_reason for o in outputs), outputs)
    final = next(o for o in outputs if o.finish_reason)
    assert final.error_type == "kv_transfer" and not final.kv_transferred
    step_until([prefill], lambda: not prefill.has_work())
    assert_clean(prefill)
    del req


def test_prefill_lost_decode_times_out(folder: Path, make_engines) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    prefill, decode = make_engines(folder, 2, clock=clock, max_num_batched_tokens=4, kv_quarantine_s=50.0)
    driver = PDDriver(prefill, decode, KVMode.BY_LAYER)
    req = driver.submit("r", list(range(5, 45)), PARAMS, timeout_s=20.0)
    driver.run(
        until=lambda: (
            "r" in prefill.scheduler.requests and prefill.scheduler.requests["r"].num_computed_tokens >= 8
        )
    )
    prefill.shutdown()  # the prefill TE is gone mid-transfer: the decode side's wait is bounded
    clock.advance(21.0)
    outputs: list = []
    step_until([decode], lambda: any(o.finish_reason for o in outputs), outputs)
    final = next(o for o in outputs if o.finish_reason)
    assert final.request_id == "r" and final.error_type == "kv_timeout"
    assert decode.cache.owners() == ["r"]  # quarantined: bytes of a dead request never land in reused blocks
    clock.advance(51.0)
    step_until([decode], lambda: not decode.has_work())
    assert_clean(decode)
    assert req.d_final is None


@pytest.mark.parametrize("mode", list(KVMode))
def test_prefill_pool_pressure_completes_without_deadlines(folder: Path, make_engines, mode: KVMode) -> None:  # type: ignore[no-untyped-def]
    """Prefill requests are never preempted once they run (their writes may read their blocks), so they take
    their whole prompt's blocks on admission: a pool too small for all of them at once serves them in turn,
    with no deadline passing (the clock never moves), instead of each holding part and waiting forever."""
    clock = FakeClock()
    (prefill,) = make_engines(folder, 1, clock=clock, max_num_batched_tokens=4, num_kv_blocks=24)
    (decode,) = make_engines(folder, 1, clock=clock, num_kv_blocks=96)  # room for every reservation
    driver = PDDriver(prefill, decode, mode)
    for i in range(4):
        driver.submit(f"r{i}", [5 + i, *range(20, 59)], PARAMS)  # 40 tokens: 10 of the 24 blocks each
    driver.run()
    for req in driver.requests.values():
        assert req.p_final.kv_transferred and req.d_final.error_type is None, (req.p_final, req.d_final)
    assert_clean(prefill, decode)


def test_a_sink_of_an_earlier_decode_incarnation_is_refused(folder: Path, make_engines) -> None:  # type: ignore[no-untyped-def]
    """Stale peer metadata: a sink naming an incarnation the decode TE no longer is (it restarted) is never
    written to; the prefill request fails with "kv_transfer" and frees everything."""
    import msgspec

    clock = FakeClock()
    prefill, decode = make_engines(folder, 2, clock=clock)
    prompt = list(range(5, 23))
    decode.add_request(
        EngineCoreRequest(
            request_id="r", prompt_token_ids=prompt, sampling_params=PARAMS, kv_transfer=KVConsume()
        )
    )
    outs: list = []
    step_until([decode], lambda: bool(outs), outs)
    stale = msgspec.structs.replace(outs[0].kv_sink, incarnation="0" * 16)
    prefill.add_request(
        EngineCoreRequest(
            request_id="r", prompt_token_ids=prompt, sampling_params=PARAMS, kv_transfer=KVProduce(sink=stale)
        )
    )
    p_outs: list = []
    step_until([prefill], lambda: any(o.finish_reason for o in p_outs), p_outs)
    final = next(o for o in p_outs if o.finish_reason)
    assert final.error_type == "kv_transfer" and "restarted" in final.stop_reason
    decode.abort(["r"])
    clock.advance(61.0)  # its quarantine: nothing came
    step_until([prefill, decode], lambda: not (prefill.has_work() or decode.has_work()))
    assert_clean(prefill, decode)
