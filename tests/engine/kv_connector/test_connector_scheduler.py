"""The scheduler side of the KV connector on its own: pure (no torch, no sockets), the clock injected, the
runner side's reports written by hand."""

from __future__ import annotations

from deepflow.cache.rtc import RelationalTensorCache
from deepflow.engine.kv_connector.base import KVConnectorOutput, KVIdentity, SendStatus
from deepflow.engine.kv_connector.scheduler import ConsumerState, KVConnectorScheduler, ProducerState
from deepflow.engine.kv_transfer import KVConsume, KVMode, KVPrefilled, KVProduce, KVSink
from deepflow.engine.request import EngineCoreRequest, ModelRunnerOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.kv_connector.conftest import FakeClock

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
IDENTITY = KVIdentity(te_id="te-x", agent_address="127.0.0.1:1", incarnation="inc")


def make(clock: FakeClock, num_blocks: int = 32, budget: int = 64) -> Scheduler:
    cache = RelationalTensorCache(num_blocks, block_size=4, num_host_blocks=0, max_context_tokens=0)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=128)
    return Scheduler(config, cache, clock, KVConnectorScheduler(IDENTITY, 4, quarantine_s=60.0))


def sampled(out, token: int = 42) -> ModelRunnerOutput:  # type: ignore[no-untyped-def]
    ids = [rid for rid, n in out.num_scheduled_tokens.items()]
    return ModelRunnerOutput(
        request_ids=ids, sampled_token_ids=[token] * len(ids), logprobs=[None] * len(ids)
    )


def test_importing_the_scheduler_side_needs_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, deepflow.engine.scheduler, deepflow.engine.kv_connector; print('torch' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )


def test_decode_reserves_waits_then_runs_on_complete_kv_only() -> None:
    clock = FakeClock()
    s = make(clock)
    prompt = list(range(10, 27))  # 17 tokens: 5 blocks, plus the first token's slot in the 5th
    s.add_request(
        EngineCoreRequest(
            request_id="d",
            prompt_token_ids=prompt,
            sampling_params=PARAMS,
            kv_transfer=KVConsume(timeout_s=5.0),
        )
    )
    out = s.schedule()
    assert out.total_num_scheduled_tokens == 0 and not out.new_requests  # nothing runs: it waits
    (sink_out,) = s.take_kv_outputs()
    sink = sink_out.kv_sink
    assert sink is not None and len(sink.block_ids) == 5 and sink.num_local_tokens == 0 and sink.sink_id
    assert s.kv.consumers["d"].state is ConsumerState.WAITING  # type: ignore[union-attr]
    assert s.stats().num_kv_waiting == 1 and s.stats().num_waiting == 1
    assert s.kv.take_new_sinks() == [sink.sink_id]  # type: ignore[union-attr]
    # The first token alone, or the bytes alone, do not start it.
    assert s.kv_prefilled(KVPrefilled(request_id="d", first_token_id=7)) == []
    assert s.schedule().total_num_scheduled_tokens == 0
    s.update_kv_connector_output(KVConnectorOutput(received=[sink.sink_id]))
    out = s.schedule()
    (new,) = out.new_requests
    assert (
        new.num_computed_tokens == 17 and new.output_token_ids == [7] and out.num_scheduled_tokens == {"d": 1}
    )
    assert new.block_ids[:5] == sink.block_ids
    clock.advance(100.0)  # decoding: the KV deadline no longer applies
    assert s.schedule().new_requests == [] and "d" in s.requests


def test_decode_timeout_then_quarantine_until_the_last_write() -> None:
    clock = FakeClock()
    s = make(clock)
    s.add_request(
        EngineCoreRequest(
            request_id="d",
            prompt_token_ids=list(range(10, 20)),
            sampling_params=PARAMS,
            kv_transfer=KVConsume(timeout_s=5.0),
        )
    )
    s.schedule()
    sink = s.take_kv_outputs()[0].kv_sink
    assert s.kv.take_new_sinks() == [sink.sink_id]  # type: ignore[union-attr]  (the engine does this)
    clock.advance(6.0)
    s.schedule()
    (failed,) = s.take_kv_outputs()
    assert failed.error_type == "kv_timeout" and failed.finish_reason == "abort"
    assert s.cache.owners() == ["d"] and s.kv.holds  # type: ignore[union-attr]
    s.update_kv_connector_output(KVConnectorOutput(received=[sink.sink_id]))  # P's last write landed
    assert not s.cache.owners() and s.kv.empty() is False  # the dropped sink awaits the runner side
    assert s.kv.take_dropped_sinks() == [sink.sink_id]  # type: ignore[union-attr]
    assert s.kv.empty()  # type: ignore[union-attr]


def test_prefill_takes_its_whole_prompt_streams_then_ends_on_done() -> None:
    clock = FakeClock()
    s = make(clock, budget=4)
    sink = KVSink(
        te_id="d", agent_address="x:1", incarnation="i", block_ids=[1, 2, 3], num_local_tokens=4, sink_id="s"
    )
    s.add_request(
        EngineCoreRequest(
            request_id="p",
            prompt_token_ids=list(range(10, 20)),
            sampling_params=PARAMS,
            kv_transfer=KVProduce(sink=sink, mode=KVMode.BY_LAYER, lease_s=10.0),
        )
    )
    out = s.schedule()
    assert len(out.new_requests[0].block_ids) == 3  # all of the prompt's blocks at once
    assert [k.request_id for k in out.kv_produce] == ["p"] and out.kv_produce[0].tag == "s"
    assert s.kv.unpreemptable("p")  # type: ignore[union-attr]
    s.update_from_output(ModelRunnerOutput(request_ids=[], sampled_token_ids=[], logprobs=[]))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"p": 4}
    s.update_from_output(ModelRunnerOutput(request_ids=[], sampled_token_ids=[], logprobs=[]))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"p": 2}  # the last chunk
    (token,) = s.update_from_output(sampled(out, 9))
    assert token.new_token_ids == [9] and token.finish_reason is None
    assert s.kv.producers["p"].state is ProducerState.SENDING and s.schedule().total_num_scheduled_tokens == 0  # type: ignore[union-attr]
    s.update_kv_connector_output(KVConnectorOutput(sends={"p": SendStatus.DONE}))
    (final,) = s.take_kv_outputs()
    assert final.kv_transferred and final.finish_reason == "stop" and not s.cache.owners()


def test_aborted_prefill_keeps_its_blocks_until_the_runner_releases_them() -> None:
    clock = FakeClock()
    s = make(clock, budget=4)
    sink = KVSink(te_id="d", agent_address="x:1", incarnation="i", block_ids=[1, 2, 3], num_local_tokens=0)
    s.add_request(
        EngineCoreRequest(
            request_id="p",
            prompt_token_ids=list(range(10, 20)),
            sampling_params=PARAMS,
            kv_transfer=KVProduce(sink=sink, mode=KVMode.BY_LAYER),
        )
    )
    s.schedule()
    s.abort(["p"])
    assert s.cache.owners() == ["p"]  # by-layer writes may be reading them
    assert s.schedule().finished_request_ids == ["p"]  # the runner forgets it (and stops writing)
    s.update_kv_connector_output(KVConnectorOutput(sends={"p": SendStatus.RELEASED}))
    assert not s.cache.owners() and s.kv.empty()  # type: ignore[union-attr]


def test_queued_prefill_abort_frees_at_once_and_lease_expiry() -> None:
    clock = FakeClock()
    s = make(clock)
    sink = KVSink(te_id="d", agent_address="x:1", incarnation="i", block_ids=[1, 2, 3], num_local_tokens=0)
    produce = KVProduce(sink=sink, lease_s=10.0)
    s.add_request(
        EngineCoreRequest(
            request_id="q", prompt_token_ids=list(range(10, 20)), sampling_params=PARAMS, kv_transfer=produce
        )
    )
    s.abort(["q"])  # never seen by the runner: nothing to wait for
    assert not s.cache.owners() and s.kv.empty()  # type: ignore[union-attr]
    s.add_request(
        EngineCoreRequest(
            request_id="p", prompt_token_ids=list(range(10, 20)), sampling_params=PARAMS, kv_transfer=produce
        )
    )
    out = s.schedule()
    s.update_from_output(sampled(out))
    clock.advance(10.5)
    s.schedule()
    (failed,) = s.take_kv_outputs()
    assert failed.error_type == "kv_transfer" and "lease" in failed.stop_reason
    assert s.cache.owners() == ["p"]  # a write may still read them: held until the runner says
    s.update_kv_connector_output(KVConnectorOutput(sends={"p": SendStatus.FAILED}))
    assert not s.cache.owners() and s.kv.empty()  # type: ignore[union-attr]
