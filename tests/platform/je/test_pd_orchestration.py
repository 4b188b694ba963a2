"""Disaggregated requests through `RoutingCoreClient`, on fake TEs (no processes): the contract of
engine/kv_transfer.py driven by the JE — D reserves, P prefills and streams the first token, D decodes the
rest — as one job with a prefill and a decode task; a TE dying (or a transfer failing, or D timing out) in
each phase; aborts both ways; the attempt bound."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deepflow.engine.core_client import EngineDeadError
from deepflow.engine.kv_transfer import KVConsume, KVPrefilled, KVProduce, KVSink
from deepflow.engine.request import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform.je.policies import RoutingRequest, make_policy
from deepflow.platform.je.policies.router import FixedRouter, TERole
from deepflow.platform.je.routing_client import MAX_ATTEMPTS, RoutingCoreClient
from deepflow.platform.jobs import JobTracker
from deepflow.platform.spec import KVTransferSpec

# The engine's outputs carry the decode side's sink and the prefill side's transfer verdict (the engine
# helper adds these fields to EngineCoreOutput); until they land, the tests use a subclass that has them.
if {"kv_sink", "kv_transferred"} <= set(EngineCoreOutput.__struct_fields__):
    Out: Any = EngineCoreOutput
else:

    class Out(EngineCoreOutput, kw_only=True, omit_defaults=True):  # type: ignore[no-redef]
        kv_sink: KVSink | None = None
        kv_transferred: bool = False


class FakeTE:
    max_model_len = 256
    eos_token_ids = (2,)
    model_path = Path("/fake")

    def __init__(self, te_id: str) -> None:
        self.te_id = te_id
        self.added: list[tuple[str, Any]] = []  # (engine request id, its kv_transfer)
        self.aborted: list[str] = []
        self.sent: list[Any] = []
        self.outputs: asyncio.Queue[EngineCoreOutputs | Exception] = asyncio.Queue()
        self.alive = True

    def add_request(self, request: EngineCoreRequest, kv_transfer: Any = None) -> None:
        if not self.alive:
            raise EngineDeadError("dead")
        self.added.append((request.request_id, kv_transfer))

    def abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids

    def send(self, command: object) -> None:
        if not self.alive:
            raise EngineDeadError("dead")
        self.sent.append(command)

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

    def emit(self, *outs: EngineCoreOutput) -> None:
        self.outputs.put_nowait(EngineCoreOutputs(outputs=list(outs)))

    # what the engine answers, per the contract
    def sink(self, engine_id: str) -> None:
        sink = KVSink(te_id=self.te_id, agent_address="shm://x", incarnation="1", block_ids=[3],
                      num_local_tokens=0)  # fmt: skip
        self.emit(Out(request_id=engine_id, new_token_ids=[], kv_sink=sink))

    def token(self, engine_id: str, *tokens: int, finish: str | None = None, **extra: Any) -> None:
        self.emit(Out(request_id=engine_id, new_token_ids=list(tokens), finish_reason=finish, **extra))

    def transferred(self, engine_id: str) -> None:
        self.emit(
            Out(request_id=engine_id, new_token_ids=[], finish_reason=FinishReason.STOP, kv_transferred=True)
        )

    def fail(self, engine_id: str, error_type: str) -> None:
        self.emit(Out(request_id=engine_id, new_token_ids=[], finish_reason=FinishReason.ABORT,
                      stop_reason=f"{error_type} here", error_type=error_type))  # fmt: skip


class Recorder(FixedRouter):
    """The default router, remembering what it was told about finished requests."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(policy=make_policy("round_robin"), **kwargs)
        self.observed: list[tuple[str, int]] = []

    def observe(self, request: RoutingRequest, output_tokens: int) -> None:
        self.observed.append((request.request_id, output_tokens))


def request(request_id: str, max_tokens: int = 4, **extra: Any) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=[5, 6, 7],
        sampling_params=SamplingParams(max_tokens=max_tokens),
        **extra,
    )


class Cluster:
    """A model's TEs: `te-pN` prefill, `te-dN` decode, `te-N` colocated, over one routing client."""

    def __init__(
        self, prefill: int = 1, decode: int = 1, colocated: int = 0, clock: Any = None, **router: Any
    ) -> None:
        ids = [f"te-p{i}" for i in range(prefill)] + [f"te-d{i}" for i in range(decode)]
        ids += [f"te-{i}" for i in range(colocated)]
        self.te = {te_id: FakeTE(te_id) for te_id in ids}
        roles = {
            te_id: TERole.PREFILL if "-p" in te_id else TERole.DECODE if "-d" in te_id else TERole.COLOCATED
            for te_id in ids
        }
        self.jobs = JobTracker()
        self.router = Recorder(**router)
        self.group = RoutingCoreClient(
            dict(self.te),
            self.router.policy,
            16,
            jobs=self.jobs,
            model="m",
            roles=roles,
            router=self.router,
            kv_transfer=KVTransferSpec(timeout_s=5, lease_s=6),
            park_s=10,
            **({"clock": clock} if clock is not None else {}),
        )
        self.group.start()

    async def batch(self) -> list[EngineCoreOutput]:
        return (await asyncio.wait_for(self.group.get_outputs(), 5)).outputs

    async def outputs(self, count: int) -> list[tuple[str, list[int], str | None]]:
        """The next `count` batches' outputs as (id, tokens, finish reason)."""
        seen = []
        for _ in range(count):
            seen += [(o.request_id, o.new_token_ids, o.finish_reason) for o in await self.batch()]
        return seen

    def tasks(self, job_id: str) -> list[tuple[str, str, list[tuple[str, str | None]]]]:
        job = self.jobs.get(job_id)
        assert job is not None
        return [(t.kind, t.state.value, [(a.te_id, a.outcome) for a in t.attempts]) for t in job.tasks]

    def state(self, job_id: str) -> str:
        job = self.jobs.get(job_id)
        assert job is not None
        return job.state.value


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_one_disaggregated_request_is_one_job_with_a_prefill_and_a_decode_task() -> None:
    async def scenario() -> None:
        c = Cluster()
        p, d = c.te["te-p0"], c.te["te-d0"]
        c.group.add_request(request("r"))
        assert c.group.te_of("r") == "te-p0,te-d0"  # known at submit: the x-deepflow-te header
        ((rid, consume),) = d.added
        assert rid == "r" and isinstance(consume, KVConsume) and consume.timeout_s == 5
        assert p.added == []  # D reserves first
        assert c.tasks("r") == [("prefill", "queued", []), ("decode", "scheduled", [("te-d0", None)])]

        d.sink("r")
        assert await c.outputs(1) == []
        ((rid, produce),) = p.added
        assert rid == "r" and isinstance(produce, KVProduce) and produce.sink.te_id == "te-d0"
        assert produce.lease_s == 6
        assert c.tasks("r")[1][1] == "running"

        p.token("r", 7, num_cached_tokens=16)
        first = await c.batch()
        assert [(o.request_id, o.new_token_ids, o.num_cached_tokens) for o in first] == [("r", [7], 16)]
        assert d.sent == [KVPrefilled(request_id="r", first_token_id=7)]
        d.token("r", 8, num_cached_tokens=3)
        p.transferred("r")  # D has every byte: P's request is done
        d.token("r", 9, 10, finish=FinishReason.LENGTH)
        rest = await c.outputs(3)
        assert rest == [("r", [8], None), ("r", [9, 10], "length")]
        assert c.tasks("r") == [
            ("prefill", "finished", [("te-p0", "finished")]),
            ("decode", "finished", [("te-d0", "finished")]),
        ]
        assert c.state("r") == "finished"
        assert c.router.observed == [("r", 4)]  # the first token + D's three
        assert c.group.live_sequences() == 0 and not p.aborted and not d.aborted
        report = c.group.report()
        assert report["modes"] == {"disaggregated/only_disaggregated": 1}
        assert report["reasons"] == {"prefill:round_robin": 1, "decode:round_robin": 1}
        assert report["recent"][0]["tes"]["prefill"]["te_id"] == "te-p0"
        c.group.shutdown()

    run(scenario)


def test_decode_te_dying_before_its_sink_retries_on_another_decode_te() -> None:
    async def scenario() -> None:
        c = Cluster(prefill=1, decode=2)
        c.group.add_request(request("r"))
        victim = next(te for te in ("te-d0", "te-d1") if c.te[te].added)
        survivor = "te-d1" if victim == "te-d0" else "te-d0"
        c.te[victim].kill()
        assert await c.outputs(1) == []  # nothing reached the client: retried silently
        assert [rid for rid, _ in c.te[survivor].added] == ["r@2"]  # a fresh engine id per attempt
        assert c.group.te_of("r") == f"te-p0,{survivor}"
        assert c.tasks("r")[1] == ("decode", "scheduled", [(victim, "te_died"), (survivor, None)])
        c.te[survivor].sink("r@2")
        await c.outputs(1)
        assert [rid for rid, _ in c.te["te-p0"].added] == ["r@2"]
        c.group.shutdown()

    run(scenario)


@pytest.mark.parametrize("how", ["dies", "times_out"])
def test_decode_failing_mid_transfer_aborts_the_prefill_and_retries_unstreamed(how: str) -> None:
    async def scenario() -> None:
        c = Cluster(prefill=1, decode=2)
        p = c.te["te-p0"]
        c.group.add_request(request("r"))
        d_id = next(te for te in ("te-d0", "te-d1") if c.te[te].added)
        d = c.te[d_id]
        d.sink("r")
        await c.outputs(1)
        assert [rid for rid, _ in p.added] == ["r"]  # P is prefilling and pushing into D
        if how == "dies":
            d.kill()
        else:
            d.fail("r", "kv_timeout")
        assert await c.outputs(1) == []
        assert p.aborted == ["r"]  # every block P holds for it is released
        other = "te-d1" if d_id == "te-d0" else "te-d0"
        # The failed decode TE is avoided while another serves (also when it only timed out).
        assert [rid for rid, _ in c.te[other].added] == ["r@2"]
        outcome = "te_died" if how == "dies" else "kv_timeout"
        prefill, decode = c.tasks("r")
        assert decode[2][0] == (d_id, outcome) and prefill[2][0] == ("te-p0", "peer_failed")
        assert prefill[1] == "queued"  # waits for the new decode TE's sink
        c.te[other].sink("r@2")
        await c.outputs(1)
        p.token("r", 1)  # a late output of the aborted attempt: void
        p.token("r@2", 7)
        assert await c.outputs(2) == [("r", [7], None)]
        c.te[other].token("r@2", 8, finish=FinishReason.STOP)
        p.transferred("r@2")
        assert await c.outputs(2) == [("r", [8], "stop")]
        assert c.state("r") == "finished"
        c.group.shutdown()

    run(scenario)


def test_decode_dying_after_the_first_token_ends_the_stream_naming_it_and_frees_the_prefill() -> None:
    async def scenario() -> None:
        c = Cluster(prefill=1, decode=2)
        p = c.te["te-p0"]
        c.group.add_request(request("r"))
        d_id = next(te for te in ("te-d0", "te-d1") if c.te[te].added)
        c.te[d_id].sink("r")
        await c.outputs(1)
        p.token("r", 7)
        assert await c.outputs(1) == [("r", [7], None)]  # streamed: a retry would repeat it
        c.te[d_id].kill()
        ((rid, _, finish),) = await c.outputs(1)
        assert (rid, finish) == ("r", "abort")
        assert p.aborted == ["r"]
        prefill, decode = c.tasks("r")
        assert decode[1] == "failed" and prefill[1] == "aborted"
        job = c.jobs.get("r")
        assert job is not None and d_id in str(job.tasks[1].error) and c.state("r") == "failed"
        assert c.router.observed == []  # not a finished request
        c.group.shutdown()

    run(scenario)


@pytest.mark.parametrize("how", ["dies", "transfer_fails", "aborts"])
def test_prefill_failing_before_its_token_aborts_the_decode_and_retries(how: str) -> None:
    async def scenario() -> None:
        c = Cluster(prefill=2, decode=1)
        d = c.te["te-d0"]
        c.group.add_request(request("r"))
        d.sink("r")
        await c.outputs(1)
        p_id = next(te for te in ("te-p0", "te-p1") if c.te[te].added)
        if how == "dies":
            c.te[p_id].kill()
        elif how == "transfer_fails":
            c.te[p_id].fail("r", "kv_transfer")
        else:
            c.te[p_id].token("r", finish=FinishReason.ABORT)
        assert await c.outputs(1) == []
        assert d.aborted == ["r"]  # D's reservation is released
        assert [rid for rid, _ in d.added] == ["r", "r@2"]  # the only decode TE, with a fresh id
        d.sink("r@2")
        await c.outputs(1)
        other = "te-p1" if p_id == "te-p0" else "te-p0"
        assert [rid for rid, _ in c.te[other].added] == ["r@2"]
        outcome = {"dies": "te_died", "transfer_fails": "kv_transfer", "aborts": "aborted"}[how]
        assert c.tasks("r")[0][2] == [(p_id, outcome), (other, None)]
        c.group.shutdown()

    run(scenario)


def test_prefill_dying_after_handing_over_its_token_leaves_the_verdict_to_the_decode_te() -> None:
    async def scenario() -> None:
        for decode_succeeds in (True, False):
            c = Cluster(prefill=1, decode=1)
            p, d = c.te["te-p0"], c.te["te-d0"]
            c.group.add_request(request("r"))
            d.sink("r")
            await c.outputs(1)
            p.token("r", 7)
            assert await c.outputs(1) == [("r", [7], None)]
            p.kill()  # before its kv_transferred reached us: D may hold every byte
            assert await c.outputs(1) == [] and d.aborted == []
            if decode_succeeds:
                d.token("r", 8, finish=FinishReason.STOP)
                assert await c.outputs(1) == [("r", [8], "stop")]
                assert c.state("r") == "finished"
                job = c.jobs.get("r")
                assert job is not None and "after the transfer" in str(job.tasks[0].error)
            else:
                d.fail("r", "kv_transfer")  # bounded by KVConsume.timeout_s on the engine side
                ((rid, _, finish),) = await c.outputs(1)
                assert (rid, finish) == ("r", "abort") and c.state("r") == "failed"
                job = c.jobs.get("r")
                assert job is not None and "te-p0" in str(job.tasks[0].error)
            c.group.shutdown()

    run(scenario)


@pytest.mark.parametrize("phase", ["reserving", "prefilling", "decoding"])
def test_an_abort_reaches_both_tes_in_every_phase(phase: str) -> None:
    async def scenario() -> None:
        c = Cluster()
        p, d = c.te["te-p0"], c.te["te-d0"]
        c.group.add_request(request("r"))
        if phase != "reserving":
            d.sink("r")
            await c.outputs(1)
        if phase == "decoding":
            p.token("r", 7)
            await c.outputs(1)
        c.group.abort(["r"])
        assert d.aborted == ["r"] and p.aborted == ([] if phase == "reserving" else ["r"])
        if phase == "reserving":
            d.sink("r")  # the reservation raced the abort: P is never asked
            await c.outputs(1)
            assert p.added == []
        else:
            p.token("r", finish=FinishReason.ABORT)
        d.token("r", finish=FinishReason.ABORT)
        batches = await c.outputs(1 if phase == "reserving" else 2)
        assert batches == [("r", [], "abort")]  # the decode side's end is the sequence's
        assert c.state("r") == "aborted" and c.group.live_sequences() == 0
        c.group.shutdown()

    run(scenario)


def test_a_non_streaming_request_starts_over_when_its_decode_te_dies_after_tokens() -> None:
    async def scenario() -> None:
        c = Cluster(prefill=1, decode=2)
        p = c.te["te-p0"]
        c.group.add_request(request("r", restartable=True))
        d_id = next(te for te in ("te-d0", "te-d1") if c.te[te].added)
        c.te[d_id].sink("r")
        await c.outputs(1)
        p.token("r", 7)
        p.transferred("r")
        c.te[d_id].token("r", 8)
        assert await c.outputs(3) == [("r", [7], None), ("r", [8], None)]
        c.te[d_id].kill()
        restarted = await c.batch()
        assert [(o.request_id, o.restarted) for o in restarted] == [("r", True)]
        other = "te-d1" if d_id == "te-d0" else "te-d0"
        assert [rid for rid, _ in c.te[other].added] == ["r@2"]
        c.group.shutdown()

    run(scenario)


def test_a_transfer_failing_everywhere_ends_after_the_attempt_bound() -> None:
    async def scenario() -> None:
        c = Cluster()
        p, d = c.te["te-p0"], c.te["te-d0"]
        c.group.add_request(request("r"))
        for attempt in range(1, MAX_ATTEMPTS + 1):
            engine_id = "r" if attempt == 1 else f"r@{attempt}"
            assert d.added[-1][0] == engine_id  # the only pair, tried again
            d.fail(engine_id, "kv_timeout")
            out = await c.outputs(1)
        assert out == [("r", [], "abort")] and len(d.added) == MAX_ATTEMPTS
        assert c.state("r") == "failed" and p.added == []
        c.group.shutdown()

    run(scenario)


def test_the_client_s_own_error_is_answered_not_retried() -> None:
    async def scenario() -> None:
        c = Cluster()
        d = c.te["te-d0"]
        c.group.add_request(request("r"))
        d.fail("r", "invalid")
        ((rid, _, finish),) = await c.outputs(1)
        assert (rid, finish) == ("r", "abort") and len(d.added) == 1 and c.te["te-p0"].added == []
        assert c.state("r") == "failed"
        c.group.shutdown()

    run(scenario)


def test_colocated_and_disaggregated_side_by_side_and_a_mode_change_on_retry() -> None:
    async def scenario() -> None:
        c = Cluster(prefill=1, decode=1, colocated=1, prefer="alternate")
        c.group.add_request(request("a"))
        c.group.add_request(request("b"))
        assert {c.group.te_of("a"), c.group.te_of("b")} == {"te-p0,te-d0", "te-0"}
        pd = "a" if c.group.te_of("a") == "te-p0,te-d0" else "b"
        colocated = "b" if pd == "a" else "a"
        assert [t[0] for t in c.tasks(pd)] == ["prefill", "decode"] and [
            t[0] for t in c.tasks(colocated)
        ] == ["colocated"]
        c.te["te-0"].token(colocated, 1, 2, finish=FinishReason.LENGTH)
        assert await c.outputs(1) == [(colocated, [1, 2], "length")]
        c.te["te-d0"].kill()  # no pair left: the disaggregated request moves to the colocated TE
        assert await c.outputs(1) == []
        assert c.group.te_of(pd) == "te-0"
        kinds = [(kind, state) for kind, state, _ in c.tasks(pd)]
        assert kinds == [("prefill", "retried"), ("decode", "retried"), ("colocated", "scheduled")]
        c.te["te-0"].token(pd, 3, finish=FinishReason.STOP)
        assert await c.outputs(1) == [(pd, [3], "stop")]
        assert c.state(pd) == "finished"  # retried tasks do not speak for the job
        assert c.group.report()["modes"].keys() >= {"colocated/alternate", "disaggregated/alternate"}
        c.group.shutdown()

    run(scenario)


def test_contexts_stay_colocated_and_a_pd_only_model_refuses_them() -> None:
    from deepflow.engine.contexts import CreateContext

    async def scenario() -> None:
        create = request("ctx", create_context=CreateContext(context_id="c1", ttl_seconds=60))
        mixed = Cluster(prefill=1, decode=1, colocated=1, prefer="disaggregated")
        mixed.group.add_request(create)
        assert mixed.group.te_of("ctx") == "te-0"
        mixed.group.shutdown()
        pd_only = Cluster()
        with pytest.raises(ValueError, match="colocated"):
            pd_only.group.add_request(create)
        assert pd_only.state("ctx") == "failed"
        pd_only.group.shutdown()

    run(scenario)


def test_no_live_pair_refuses_at_submit() -> None:
    async def scenario() -> None:
        c = Cluster()
        c.te["te-p0"].alive = False
        with pytest.raises(EngineDeadError):
            c.group.add_request(request("r"))
        assert c.state("r") == "failed"
        c.group.shutdown()

    run(scenario)


def test_job_records_encode_with_both_tasks() -> None:
    async def scenario() -> None:
        c = Cluster()
        c.group.add_request(request("r#0"))
        job = c.jobs.get("r")
        assert job is not None
        raw = msgspec.to_builtins(job)
        assert [(t["kind"], t["sequence_id"]) for t in raw["tasks"]] == [
            ("prefill", "r#0"),
            ("decode", "r#0"),
        ]
        c.group.shutdown()

    run(scenario)


def test_a_retry_with_no_pair_left_waits_for_the_restarted_te_within_a_bound() -> None:
    """1P+1D: the decode TE dies mid-transfer; the request (not streamed) waits for the cluster manager's
    restart of it — bounded: past `park_s` it fails naming why; a client abort ends the wait at once."""

    async def scenario() -> None:
        now = [0.0]
        c = Cluster(clock=lambda: now[0])
        c.group.add_request(request("r"))
        c.group.add_request(request("s"))
        c.group.add_request(request("t"))
        d = c.te["te-d0"]
        d.sink("r")
        await c.outputs(1)
        d.kill()
        assert await c.outputs(1) == []  # nobody streamed: all three wait
        assert c.te["te-p0"].aborted == ["r"]  # P started r: its blocks are released
        assert c.tasks("r")[1][1] == "queued" and c.state("r") == "queued"
        c.group.abort(["t"])
        assert await c.outputs(1) == [("t", [], "abort")] and c.state("t") == "aborted"
        now[0] = 9.0
        assert c.group.expire_parked() == []  # still within its bound
        restarted = FakeTE("te-d0")
        c.group.add_te("te-d0", restarted, TERole.DECODE)  # the CM's push of the new incarnation
        assert sorted(rid for rid, _ in restarted.added) == ["r@2", "s@2"]
        assert c.tasks("r")[1][2] == [("te-d0", "te_died"), ("te-d0", None)]
        restarted.kill()
        assert await c.outputs(1) == []  # parked again
        now[0] = 30.0
        expired = c.group.expire_parked()
        assert sorted((o.request_id, o.finish_reason) for o in expired) == [("r", "abort"), ("s", "abort")]
        assert "within 10 s" in str(expired[0].stop_reason) and c.state("r") == "failed"
        assert c.group.live_sequences() == 0
        c.group.shutdown()

    run(scenario)


def test_a_first_token_arriving_with_the_prefill_s_end_and_a_late_failed_confirmation() -> None:
    """By layer, P may finish (kv_transferred) in the output that carries its token: the token is streamed
    and handed over, the sequence goes on at D. A P that reports its transfer failed after D decoded (D
    never starts before every byte arrived) does not turn the answered request into a failure."""

    async def scenario() -> None:
        c = Cluster()
        p, d = c.te["te-p0"], c.te["te-d0"]
        for rid, p_end in (("a", "together"), ("b", "late_failure")):
            c.group.add_request(request(rid))
            d.sink(rid)
            await c.outputs(1)
            if p_end == "together":
                p.token(rid, 7, finish=FinishReason.STOP, kv_transferred=True)
            else:
                p.token(rid, 7)
            assert await c.outputs(1) == [(rid, [7], None)]  # not finished: D has the rest
            assert d.sent[-1] == KVPrefilled(request_id=rid, first_token_id=7)
            d.token(rid, 8, finish=FinishReason.STOP)
            assert await c.outputs(1) == [(rid, [8], "stop")]
            if p_end == "late_failure":
                p.fail(rid, "kv_transfer")
                await c.outputs(1)
            assert c.state(rid) == "finished", c.tasks(rid)
        assert c.router.observed == [("a", 2), ("b", 2)]
        c.group.shutdown()

    run(scenario)


def test_a_te_that_stays_alive_but_never_answers_is_bounded_by_the_je() -> None:
    """The engines bound the hand-over themselves (KVConsume.timeout_s); the JE's own bound, past theirs,
    covers a TE that never answers: the leg is aborted there and the sequence retried (another pair when
    there is one)."""
    from deepflow.platform.je.routing_client import HANDOVER_SLACK_SECONDS

    async def scenario() -> None:
        now = [0.0]
        c = Cluster(prefill=2, decode=2, clock=lambda: now[0])
        c.group.add_request(request("r"))
        d_id = next(te for te in ("te-d0", "te-d1") if c.te[te].added)
        now[0] = 5 + HANDOVER_SLACK_SECONDS - 1  # KVConsume.timeout_s = 5 in these tests
        assert c.group.expire_stalled() == []
        now[0] += 2
        assert c.group.expire_stalled() == []  # retried silently: nothing had streamed
        assert c.te[d_id].aborted == ["r"]
        other_d = "te-d1" if d_id == "te-d0" else "te-d0"
        assert [rid for rid, _ in c.te[other_d].added] == ["r@2"]
        assert c.tasks("r")[1][2][0] == (d_id, "kv_timeout")
        c.te[other_d].sink("r@2")
        await c.outputs(1)
        p_id = next(te for te in ("te-p0", "te-p1") if c.te[te].added)
        now[0] += 5 + HANDOVER_SLACK_SECONDS + 1  # P never sends its first token either
        assert c.group.expire_stalled() == []
        assert c.te[p_id].aborted == ["r@2"] and c.te[other_d].aborted == ["r@2"]
        assert c.tasks("r")[0][2][0] == (p_id, "kv_timeout")
        c.group.shutdown()

    run(scenario)
