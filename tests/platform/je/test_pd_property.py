"""A property of the JE's orchestration (hypothesis): over random submits, steps, client aborts, TE kills and
restarts, on fake engines that follow engine/kv_transfer.py's contract, once the dead TEs are back and every
engine has run dry —

- every request the JE accepted got exactly one final output (never none: no client waits forever; never
  two), and one that finished normally got all its tokens after its last restart;
- no engine holds a request any more (every block on every TE was released: each leg either finished there
  or was aborted there), and the JE holds no record, leg or parked retry;
- every job is in a final state."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.engine.core_client import EngineDeadError
from deepflow.engine.kv_transfer import KVConsume, KVPrefilled, KVProduce, KVSink
from deepflow.engine.request import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform.je.policies import make_policy
from deepflow.platform.je.policies.router import FixedRouter, TERole
from deepflow.platform.je.routing_client import RoutingCoreClient
from deepflow.platform.jobs import TERMINAL, JobTracker

ROLES = {"te-p0": TERole.PREFILL, "te-p1": TERole.PREFILL, "te-d0": TERole.DECODE, "te-0": TERole.COLOCATED}


class SimTE:
    """An engine that follows the contract, one stage per `step`; its outputs go to the driver."""

    max_model_len = 256
    eos_token_ids = (2,)
    model_path = Path("/fake")

    def __init__(self, te_id: str) -> None:
        self.te_id = te_id
        self.live: dict[str, dict[str, Any]] = {}  # engine request id -> its state (holding blocks)
        self.pending: list[EngineCoreOutput] = []
        self.alive = True

    def add_request(self, request: EngineCoreRequest, kv_transfer: Any = None) -> None:
        if not self.alive:
            raise EngineDeadError("dead")
        assert request.request_id not in self.live, "an engine id reused while live"
        self.live[request.request_id] = {
            "max": request.sampling_params.max_tokens,
            "kv": kv_transfer,
            "made": 0,
        }

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self.live.pop(rid, None) is not None:
                self.pending.append(EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason="abort"))

    def send(self, command: object) -> None:
        if not self.alive:
            raise EngineDeadError("dead")
        if isinstance(command, KVPrefilled) and command.request_id in self.live:
            state = self.live[command.request_id]
            state["prefilled"], state["made"] = command.first_token_id, 1

    def step(self) -> None:
        for rid, state in list(self.live.items()):
            kv, out = state["kv"], None
            if isinstance(kv, KVConsume):
                if "sink" not in state:
                    state["sink"] = True
                    sink = KVSink(te_id=self.te_id, agent_address="x", incarnation="1", block_ids=[1],
                                  num_local_tokens=0)  # fmt: skip
                    out = EngineCoreOutput(request_id=rid, new_token_ids=[], kv_sink=sink)
                elif "prefilled" in state:
                    out = self._token(rid, state)
            elif isinstance(kv, KVProduce):
                if not state["made"]:
                    state["made"] = 1
                    out = EngineCoreOutput(request_id=rid, new_token_ids=[7])
                else:
                    del self.live[rid]
                    out = EngineCoreOutput(
                        request_id=rid, new_token_ids=[], finish_reason="stop", kv_transferred=True
                    )
            else:
                out = self._token(rid, state)
            if out is not None:
                self.pending.append(out)

    def _token(self, rid: str, state: dict[str, Any]) -> EngineCoreOutput:
        if state["made"] >= state["max"]:  # the first token was the last
            del self.live[rid]
            return EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason="length")
        state["made"] += 1
        done = state["made"] >= state["max"]
        if done:
            del self.live[rid]
        return EngineCoreOutput(request_id=rid, new_token_ids=[8], finish_reason="length" if done else None)

    def is_alive(self) -> bool:
        return self.alive

    async def get_outputs(self) -> EngineCoreOutputs:
        await asyncio.Event().wait()  # the driver hands outputs over itself
        raise AssertionError

    def shutdown(self) -> None:
        pass


class Driver:
    def __init__(self, prefer: str) -> None:
        self.te = {te_id: SimTE(te_id) for te_id in ROLES}
        self.jobs = JobTracker()
        policy = make_policy("round_robin")
        self.group = RoutingCoreClient(
            dict(self.te),
            policy,
            16,
            jobs=self.jobs,
            roles=dict(ROLES),
            router=FixedRouter(policy=policy, prefer=prefer),
        )
        self.group._merged = asyncio.Queue()  # what it publishes outside a batch (parked retries)
        self.finals: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.accepted: dict[str, int] = {}  # request id -> max_tokens

    def take(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            assert out.request_id in self.accepted, out
            assert self.finals.get(out.request_id, 0) == 0, f"output after the end: {out}"
            if out.restarted:
                self.tokens[out.request_id] = 0
                continue
            self.tokens[out.request_id] = self.tokens.get(out.request_id, 0) + len(out.new_token_ids)
            if out.finish_reason is not None:
                self.finals[out.request_id] = self.finals.get(out.request_id, 0) + 1

    def drain(self) -> None:
        assert self.group._merged is not None
        while not self.group._merged.empty():
            item = self.group._merged.get_nowait()
            assert isinstance(item, EngineCoreOutputs)
            self.take(item.outputs)

    def step(self, te_id: str) -> None:
        sim = self.te[te_id]
        if not sim.alive:
            return
        sim.step()
        self.flush(te_id)

    def flush(self, te_id: str) -> None:
        sim = self.te[te_id]
        outs, sim.pending = sim.pending, []
        if outs and sim.alive:
            self.take(self.group._absorb(self.group.tes[te_id], EngineCoreOutputs(outputs=outs)).outputs)
        self.drain()

    def submit(self, rid: str, max_tokens: int, restartable: bool) -> None:
        request = EngineCoreRequest(
            request_id=rid,
            prompt_token_ids=[5, 6, 7],
            sampling_params=SamplingParams(max_tokens=max_tokens),
            restartable=restartable,
        )
        self.accepted[rid] = max_tokens
        try:
            self.group.add_request(request)
        except EngineDeadError:
            del self.accepted[rid]  # refused at submit: the client got its 503
        self.drain()

    def kill(self, te_id: str) -> None:
        sim = self.te[te_id]
        if sim.alive:
            sim.alive, sim.live, sim.pending = False, {}, []
            self.take(self.group._fail_over(self.group.tes[te_id], "killed").outputs)
            self.drain()

    def restart(self, te_id: str) -> None:
        if not self.te[te_id].alive:
            self.te[te_id] = SimTE(te_id)
            self.group.add_te(te_id, self.te[te_id], ROLES[te_id])
            self.drain()

    def abort(self, rid: str) -> None:
        self.group.abort([rid])
        for te_id in self.te:
            self.flush(te_id)  # the engines answer an abort at once


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["submit", "step", "step", "step", "abort", "kill", "restart"]),
        st.integers(0, 7),
        st.integers(1, 3),
        st.booleans(),
    ),
    max_size=50,
)


@settings(max_examples=200, deadline=None)
@given(actions=ACTIONS, prefer=st.sampled_from(["disaggregated", "alternate"]))
def test_every_request_ends_once_and_no_engine_holds_anything(actions: list[Any], prefer: str) -> None:
    async def scenario() -> None:
        d = Driver(prefer)
        names = list(ROLES)
        for n, (kind, arg, max_tokens, restartable) in enumerate(actions):
            te_id = names[arg % len(names)]
            if kind == "submit":
                d.submit(f"r{n}", max_tokens, restartable)
            elif kind == "step":
                d.step(te_id)
            elif kind == "abort" and d.accepted:
                d.abort(sorted(d.accepted)[arg % len(d.accepted)])
            elif kind == "kill":
                d.kill(te_id)
            elif kind == "restart":
                d.restart(te_id)
        for te_id in names:
            d.restart(te_id)
        for _ in range(200):  # run dry: every engine steps until none holds a request
            if not any(sim.live or sim.pending for sim in d.te.values()):
                break
            for te_id in names:
                d.step(te_id)
        assert not any(sim.live for sim in d.te.values()), {t: s.live for t, s in d.te.items() if s.live}
        for rid, max_tokens in d.accepted.items():
            assert d.finals.get(rid) == 1, (rid, d.finals.get(rid), d.group.te_of(rid))
            job = d.jobs.get(rid)
            assert job is not None and job.state in TERMINAL, (rid, job)
            if job.state.value == "finished":
                assert d.tokens[rid] == max_tokens, (rid, d.tokens[rid], max_tokens)
        assert d.group.live_sequences() == 0 and not d.group._parked
        assert not any(te.legs for te in d.group.tes.values())
        d.group.shutdown()

    asyncio.run(scenario())


def test_one_hand_written_case() -> None:
    """The driver itself: a plain disaggregated request runs to its end."""

    async def scenario() -> None:
        d = Driver("disaggregated")
        d.submit("r", 3, False)
        for _ in range(6):
            for te_id in ROLES:
                d.step(te_id)
        assert d.finals == {"r": 1} and d.tokens == {"r": 3}
        assert d.jobs.get("r").state.value == "finished"  # type: ignore[union-attr]
        d.group.shutdown()

    asyncio.run(scenario())
