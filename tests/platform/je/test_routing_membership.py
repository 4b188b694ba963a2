"""`RoutingCoreClient` as the job executor uses it, on fake TEs (no processes): TEs join and die while it
runs, counters never go back when a TE leaves, every request is a job whose task records each attempt."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from deepflow.engine.core_client import EngineDeadError, ResetPrefixCache
from deepflow.engine.request import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    SchedulerStats,
)
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform.je.policies import make_policy
from deepflow.platform.je.routing_client import RoutingCoreClient
from deepflow.platform.jobs import JobTracker, State


class FakeTE:
    max_model_len = 256
    eos_token_ids = (2,)
    model_path = Path("/fake")

    def __init__(self) -> None:
        self.added: list[str] = []
        self.outputs: asyncio.Queue[EngineCoreOutputs | Exception] = asyncio.Queue()
        self.alive = True

    def add_request(self, request: EngineCoreRequest) -> None:
        if not self.alive:
            raise EngineDeadError("dead")
        self.added.append(request.request_id)

    def abort(self, request_ids: list[str]) -> None:
        pass

    def send(self, command: object) -> None:
        pass

    async def get_outputs(self) -> EngineCoreOutputs:
        item = await self.outputs.get()
        if isinstance(item, Exception):
            raise item
        return item

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive = False
        self.outputs.put_nowait(EngineDeadError("killed"))

    def shutdown(self) -> None:
        pass


def stats(hits: int, running: int = 0) -> SchedulerStats:
    return SchedulerStats(
        num_running=running,
        num_waiting=0,
        kv_cache_usage=0.1,
        num_preemptions_total=0,
        prefix_cache_queries_total=2 * hits,
        prefix_cache_hits_total=hits,
    )


def request(request_id: str) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=[5, 6, 7], sampling_params=SamplingParams(max_tokens=4)
    )


def token(request_id: str, finish: FinishReason | None = None) -> EngineCoreOutput:
    return EngineCoreOutput(request_id=request_id, new_token_ids=[9], finish_reason=finish)


async def next_batch(group: RoutingCoreClient) -> EngineCoreOutputs:
    return await asyncio.wait_for(group.get_outputs(), 5)


def test_tes_join_and_die_jobs_record_attempts_counters_never_go_back() -> None:
    async def scenario() -> None:
        jobs = JobTracker()
        a, b = FakeTE(), FakeTE()
        group = RoutingCoreClient({"te-0": a}, make_policy("round_robin"), 16, jobs=jobs, model="m")
        group.add_request(request("x"))
        a.outputs.put_nowait(EngineCoreOutputs(outputs=[token("x")], stats=stats(hits=100, running=1)))
        first = await next_batch(group)
        assert first.stats is not None and first.stats.prefix_cache_hits_total == 100
        job = jobs.get("x")
        assert job is not None and job.state == State.RUNNING and job.tasks[0].te_id == "te-0"

        group.add_te("te-1", b)  # joins while running: the pump starts at once
        group.add_request(request("y"))  # streamed nothing yet
        assert group.te_of("y") == "te-1"
        b.outputs.put_nowait(EngineCoreOutputs(outputs=[], stats=stats(hits=7)))
        assert (await next_batch(group)).stats.prefix_cache_hits_total == 107  # type: ignore[union-attr]

        b.kill()  # y had not streamed: retried on te-0; te-1's hits stay counted
        failed_over = await next_batch(group)
        assert failed_over.outputs == [] and failed_over.stats is not None
        assert failed_over.stats.prefix_cache_hits_total == 107
        assert group.te_of("y") == "te-0" and a.added == ["x", "y"]
        y = jobs.get("y")
        assert y is not None
        assert [(t.te_id, t.outcome) for t in y.tasks[0].attempts] == [("te-1", "te_died"), ("te-0", None)]

        a.outputs.put_nowait(EngineCoreOutputs(outputs=[token("y", FinishReason.LENGTH)], stats=stats(120)))
        done = await next_batch(group)
        assert done.stats is not None and done.stats.prefix_cache_hits_total == 127  # te-0's 120 + te-1's 7
        assert y.state == State.FINISHED

        a.kill()  # x had streamed: it ends with an abort naming the TE; the group has no TE left
        ended = await next_batch(group)
        assert [(o.request_id, o.finish_reason) for o in ended.outputs] == [("x", FinishReason.ABORT)]
        assert "te-0" in str(ended.outputs[0].stop_reason)
        x = jobs.get("x")
        assert x is not None and x.state == State.FAILED and x.tasks[0].streamed
        assert not group.is_alive()
        with pytest.raises(EngineDeadError):
            group.add_request(request("z"))
        z = jobs.get("z")
        assert z is not None and z.state == State.FAILED

        c = FakeTE()
        group.add_te("te-0", c)  # the CM restarted te-0: the group serves again
        assert group.is_alive()
        group.add_request(request("w"))
        assert c.added == ["w"]
        group.shutdown()

    asyncio.run(scenario())


def test_aborted_requests_are_not_retried_and_bad_or_stale_batches_are_contained() -> None:
    async def scenario() -> None:
        jobs = JobTracker()
        a, b = FakeTE(), FakeTE()
        group = RoutingCoreClient({"te-0": a, "te-1": b}, make_policy("round_robin"), 16, jobs=jobs)
        group.start()
        group.add_request(request("p"))  # te-0
        group.add_request(request("q"))  # te-1
        group.add_request(request("r"))  # te-0
        assert (group.te_of("p"), group.te_of("q"), group.te_of("r")) == ("te-0", "te-1", "te-0")
        group.abort(["r"])  # the client left; the abort is on its way when te-0 dies
        # A batch the policy cannot digest (an unknown request's output is skipped; a broken event raises)
        # is logged and dropped: te-0 stays in the group.
        a.outputs.put_nowait(EngineCoreOutputs(outputs=[token("nobody")], kv_events=[object()]))  # type: ignore[list-item]
        a.outputs.put_nowait(EngineCoreOutputs(outputs=[token("p")], stats=stats(1)))
        batch = await next_batch(group)
        assert [o.request_id for o in batch.outputs] == ["p"] and not group.tes["te-0"].dead
        a.kill()
        ended = await next_batch(group)
        # p streamed and r was aborted: both end here; neither runs again on te-1.
        assert sorted(o.request_id for o in ended.outputs) == ["p", "r"]
        assert b.added == ["q"]
        r = jobs.get("r")
        assert r is not None and r.state == State.ABORTED
        group.send(ResetPrefixCache())  # skips the dead TE instead of failing
        # A late batch from a replaced incarnation is void.
        stale = FakeTE()
        group.add_te("te-2", stale)
        b.alive = False  # for a moment: s must go to te-2
        group.add_request(request("s"))
        b.alive = True
        assert group.te_of("s") == "te-2"
        group.tes["te-2"].dead = True  # as if failed over by the CM's push before its read completed
        stale.outputs.put_nowait(EngineCoreOutputs(outputs=[token("s", FinishReason.LENGTH)]))
        b.outputs.put_nowait(EngineCoreOutputs(outputs=[token("q", FinishReason.LENGTH)]))
        batch = await next_batch(group)
        assert [o.request_id for o in batch.outputs] == ["q"]
        group.shutdown()

    asyncio.run(scenario())


def test_a_restartable_request_starts_over_on_another_te_and_its_client_sees_only_the_new_run() -> None:
    """A non-streaming request (restartable) whose TE dies after producing tokens is retried: the front end
    is told to forget the dead TE's tokens, and the job records a second attempt."""
    from deepflow.engine.outputs import OutputProcessor, RequestState

    async def scenario() -> None:
        jobs = JobTracker()
        a, b = FakeTE(), FakeTE()
        group = RoutingCoreClient({"te-0": a, "te-1": b}, make_policy("round_robin"), 16, jobs=jobs)
        group.start()
        processor = OutputProcessor()
        state = RequestState("job", None, [5, 6, 7], SamplingParams(max_tokens=4), tokenizer=None)
        processor.add(state)
        group.add_request(msgspec.structs.replace(request("job"), restartable=True))
        assert group.te_of("job") == "te-0"
        a.outputs.put_nowait(EngineCoreOutputs(outputs=[token("job"), token("job")]))
        processor.process((await next_batch(group)).outputs)
        assert state.sequences["job"].output.token_ids == [9, 9]
        a.kill()
        restarted = await next_batch(group)
        assert [(o.request_id, o.restarted, o.finish_reason) for o in restarted.outputs] == [
            ("job", True, None)
        ]
        processor.process(restarted.outputs)
        assert state.sequences["job"].output.token_ids == [] and group.te_of("job") == "te-1"
        b.outputs.put_nowait(EngineCoreOutputs(outputs=[EngineCoreOutput(
            request_id="job", new_token_ids=[3, 4], finish_reason=FinishReason.LENGTH)]))  # fmt: skip
        processor.process((await next_batch(group)).outputs)
        seq = state.sequences["job"].output
        assert seq.token_ids == [3, 4] and seq.finish_reason == "length"
        job = jobs.get("job")
        assert job is not None and job.state == State.FINISHED
        assert [(t.te_id, t.outcome) for t in job.tasks[0].attempts] == [
            ("te-0", "te_died"),
            ("te-1", "finished"),
        ]
        group.shutdown()

    asyncio.run(scenario())
