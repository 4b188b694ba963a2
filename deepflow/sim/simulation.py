"""The cluster simulator: a JE routing with the real policies over simulated TEs, on one virtual clock.

Arrivals start sessions; each request is routed by the real JE policy (`make_policy`) over a snapshot of the
group — every TE's last report raised by the routed-load estimate (`policies.estimate`, shared with the
routing client) and the group's `GlobalPromptTree`, fed by the TEs' real KV events — and handed to its TE
(`SimTE`). TE reports reach the JE when the TE emits them. Every request gets a `RequestRecord`, so the
report is `deepflow bench serve`'s (`bench.report.summarize`).

Deterministic: the same config and seed give the same records. No wall clock inside (the CLI times the run).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from deepflow.bench.client import RequestRecord
from deepflow.bench.report import Summary, summarize
from deepflow.cache.events import KVEvent
from deepflow.engine.config import EngineConfig
from deepflow.engine.request import EngineCoreOutput, EngineCoreRequest, FinishReason, SchedulerStats
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform.je.policies import (
    GlobalPromptTree,
    GroupSnapshot,
    RoutingRequest,
    estimated_load,
    make_policy,
    routed_tokens,
)
from deepflow.sim.costmodel import HardwareProfile, StepShape, load_profile
from deepflow.sim.events import EventLoop
from deepflow.sim.runner import PseudoTokens, SimRunner
from deepflow.sim.te import SimTE, engine_layout
from deepflow.sim.workload import SimSession, Workload, WorkloadSpec, chat_prompt

__all__ = ["SimConfig", "SimResult", "Simulation", "default_engine_config", "estimate_capacity"]


def default_engine_config(**overrides: Any) -> EngineConfig:
    """A platform TE's engine config (the CM turns KV events on for its TEs' JEs)."""
    return EngineConfig(**{"kv_events": True, **overrides})


@dataclass
class SimConfig:
    num_tes: int = 4
    policy: str = "combined"
    policy_params: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=default_engine_config)
    profile: HardwareProfile | None = None  # None: the shipped default
    # After the last arrival, requests run on for at most this long (None: until all end); the rest are
    # counted as failed ("unfinished").
    drain_s: float | None = 600.0
    sample_interval_s: float = 10.0  # time series for the plot
    itl_sample_every: int = 1  # keep the inter-token gaps of one request in N (memory of long runs)


@dataclass
class _Live:
    record: RequestRecord
    session: SimSession
    turn: int
    user: list[int]
    arrival: float
    last_token_at: float = 0.0
    keep_itl: bool = True
    answer: list[int] = field(default_factory=list)
    history: list[tuple[list[int], list[int]]] = field(default_factory=list)


@dataclass
class _Route:
    report: SchedulerStats | None = None
    routed: int = 0
    requests: int = 0


@dataclass
class SimResult:
    config: SimConfig
    workload: str
    summary: Summary
    records: list[RequestRecord]
    reasons: dict[str, int]
    per_te: list[dict[str, Any]]
    timeseries: dict[str, list[float]]
    simulated_s: float
    num_events: int
    num_steps: int
    wall_s: float = 0.0  # set by the caller that timed it

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        engine = asdict(self.config.engine)
        profile = self.config.profile
        return {
            "simulator": {
                "num_tes": self.config.num_tes,
                "policy": self.config.policy,
                "policy_params": self.config.policy_params,
                "engine": engine,
                "profile": profile.to_dict() if profile is not None else None,
                "workload": self.workload,
                "simulated_s": self.simulated_s,
                "num_events": self.num_events,
                "num_steps": self.num_steps,
                "wall_s": self.wall_s,
                "itl_sample_every": self.config.itl_sample_every,
            },
            "summary": asdict(self.summary),
            "routing_reasons": self.reasons,
            "per_te": self.per_te,
            "timeseries": self.timeseries,
            "requests": [r.to_dict() for r in self.records],
        }


class Simulation:
    def __init__(self, config: SimConfig, workload: Iterable[SimSession] | WorkloadSpec) -> None:
        if config.num_tes < 1:
            raise ValueError("the cluster needs at least one TE")
        self.config = config
        self.workload = Workload(workload) if isinstance(workload, WorkloadSpec) else workload
        self.profile = config.profile or load_profile()
        config.profile = self.profile
        model = self.profile.model
        self.loop = EventLoop()
        self.eos = model.eos_token_ids[0] if model.eos_token_ids else 2
        self.tokens = PseudoTokens(self.eos)
        engine = config.engine
        self.tes = [
            SimTE(
                f"te-{i:03d}",
                engine,
                model,
                SimRunner(self.profile, self.tokens),
                self.loop,
                self._on_report,
            )
            for i in range(config.num_tes)
        ]
        self.by_id = {te.te_id: te for te in self.tes}
        self.routes = {te.te_id: _Route() for te in self.tes}
        self.policy = make_policy(config.policy, **config.policy_params)
        self.tree = GlobalPromptTree(engine.block_size)
        self.max_model_len = self.tes[0].max_model_len
        self.reasons: Counter[str] = Counter()
        self.records: list[RequestRecord] = []
        self._live: dict[str, _Live] = {}
        self._next_index = 0
        self._sessions: Iterator[SimSession] | None = None
        self._last_arrival = 0.0
        self._arrivals_done = False
        self.progress: Callable[[float], None] | None = None  # called with the simulated time, each minute
        self._output_tokens = 0
        self.timeseries: dict[str, list[float]] = {
            k: [] for k in ("t", "running", "waiting", "kv_usage", "output_tokens", "preemptions")
        }

    # ---- arrivals ----------------------------------------------------------------------------------
    def _arrive_next(self) -> None:
        assert self._sessions is not None
        session = next(self._sessions, None)
        if session is None:
            self._arrivals_done = True
            return
        self.loop.at(max(session.start_s, self.loop.now), self._arrival, session)

    def _arrival(self, session: SimSession) -> None:
        self._last_arrival = self.loop.now
        self._start_turn(session, 0, [])
        self._arrive_next()  # one pending arrival at a time: sessions are made as they are reached

    def _start_turn(self, session: SimSession, turn: int, history: list[tuple[list[int], list[int]]]) -> None:
        now = self.loop.now
        spec = session.turns[turn]
        prompt = chat_prompt(session.system, history, spec.prompt) if session.chat else spec.prompt
        index = self._next_index
        self._next_index += 1
        request_id = f"s{session.index}.{turn}"
        record = RequestRecord(index, session.index, turn, len(prompt), start_s=now)
        record.prompt_tokens = len(prompt)
        self.records.append(record)
        max_tokens = spec.max_tokens or spec.output_len
        if spec.output_len < max_tokens:
            self.tokens.targets[request_id] = spec.output_len
        live = _Live(record, session, turn, spec.prompt, now, now, index % self.config.itl_sample_every == 0)
        live.history = history
        self._live[request_id] = live
        request = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=spec.output_len >= max_tokens
            ),
            eos_token_ids=[self.eos],
            arrival_time=now,
            cache_salt=session.cache_salt,
        )
        self._route(request).add_request(request)

    # ---- the JE ------------------------------------------------------------------------------------
    def _route(self, request: EngineCoreRequest) -> SimTE:
        routes = self.routes
        loads = [estimated_load(te_id, r.report, r.routed, True) for te_id, r in routes.items()]
        decision = self.policy.select(
            RoutingRequest(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                cache_salt=request.cache_salt,
                expected_output_tokens=request.sampling_params.max_tokens,
                ignore_eos=request.sampling_params.ignore_eos,
            ),
            GroupSnapshot(tes=loads, tree=self.tree),
        )
        self.reasons[str(decision.reason)] += 1
        route = routes[decision.te_id]
        route.routed += routed_tokens(
            len(request.prompt_token_ids), decision.matched_tokens, request.sampling_params.max_tokens
        )
        route.requests += 1
        return self.by_id[decision.te_id]

    def _on_report(
        self, te: SimTE, outputs: list[EngineCoreOutput], stats: SchedulerStats, events: list[KVEvent]
    ) -> None:
        route = self.routes[te.te_id]
        route.report = stats
        route.routed = 0
        if events:
            replace = msgspec.structs.replace
            apply = self.tree.apply
            te_id = te.te_id
            for event in events:  # stamped with their TE, as the routing client does
                apply(replace(event, te_id=te_id))
        if outputs:
            self._outputs(outputs)

    # ---- outputs -----------------------------------------------------------------------------------
    def _outputs(self, outputs: list[EngineCoreOutput]) -> None:
        now = self.loop.now
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            record = live.record
            if out.new_token_ids:
                n = len(out.new_token_ids)
                if record.output_tokens == 0:
                    record.ttft_s = now - live.arrival
                elif live.keep_itl:
                    record.itl_s.append(now - live.last_token_at)
                record.output_tokens += n
                self._output_tokens += n
                live.last_token_at = now
                if live.session.chat:
                    live.answer.extend(out.new_token_ids)
            if out.finish_reason is not None:
                self._finish(out, live, now)

    def _finish(self, out: EngineCoreOutput, live: _Live, now: float) -> None:
        record = live.record
        del self._live[out.request_id]
        self.tokens.forget(out.request_id)
        if out.finish_reason == FinishReason.ABORT or record.output_tokens == 0:
            record.fail("refused" if out.error_type else "aborted", str(out.stop_reason or ""))
        else:
            record.success = True
            record.e2e_s = now - live.arrival
            record.cached_tokens = out.num_cached_tokens
        session = live.session
        nxt = live.turn + 1
        if nxt >= len(session.turns):
            return
        if not record.success:  # the rest of the conversation cannot be sent, as in the bench
            for t in range(nxt, len(session.turns)):
                lost = RequestRecord(self._next_index, session.index, t, 0)
                self._next_index += 1
                lost.fail("not sent", f"turn {t - 1} of this conversation failed")
                self.records.append(lost)
            return
        answer = live.answer[:-1] if live.answer and live.answer[-1] == self.eos else live.answer
        history = [*live.history, (live.user, answer)] if session.chat else []
        self.loop.at(now + session.think_time_s, self._start_turn, session, nxt, history)

    # ---- sampling ----------------------------------------------------------------------------------
    def _sample(self) -> None:
        ts = self.timeseries
        ts["t"].append(self.loop.now)
        ts["running"].append(sum(len(te.scheduler.running) for te in self.tes))
        ts["waiting"].append(sum(len(te.scheduler.waiting) for te in self.tes))
        ts["kv_usage"].append(sum(te.cache.usage() for te in self.tes) / len(self.tes))
        ts["output_tokens"].append(self._output_tokens)
        ts["preemptions"].append(sum(te.scheduler.num_preemptions_total for te in self.tes))
        if self._live or self._sessions_pending():
            self.loop.after(self.config.sample_interval_s, self._sample)

    def _sessions_pending(self) -> bool:
        return self.loop.next_time() is not None

    # ---- run ---------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        self._sessions = iter(self.workload)
        self._arrive_next()
        self.loop.at(0.0, self._sample)
        drain = self.config.drain_s
        loop = self.loop
        # Until arrivals end (the workload's duration), then at most `drain` more seconds.
        while len(loop):
            loop.run(until=loop.now + 60.0)
            if self.progress is not None:
                self.progress(loop.now)
            if drain is not None and self._arrivals_done and loop.now >= self._last_arrival + drain:
                break
        for live in list(self._live.values()):
            live.record.fail("unfinished", "still running when the simulation stopped")
        self._live.clear()
        ok_ends = [
            r.start_s + r.e2e_s for r in self.records if r.success and r.start_s is not None and r.e2e_s
        ]
        duration = max(ok_ends, default=self.loop.now)
        summary = summarize(self.records, duration)
        return SimResult(
            config=self.config,
            workload=self.workload.describe() if hasattr(self.workload, "describe") else "custom",
            summary=summary,
            records=self.records,
            reasons=dict(self.reasons.most_common()),
            per_te=[self._te_summary(te) for te in self.tes],
            timeseries=self.timeseries,
            simulated_s=self.loop.now,
            num_events=self.loop.num_events,
            num_steps=sum(te.runner.num_steps for te in self.tes),
        )

    def _te_summary(self, te: SimTE) -> dict[str, Any]:
        s = te.scheduler.stats()
        return {
            "te_id": te.te_id,
            "requests": self.routes[te.te_id].requests,
            "steps": te.runner.num_steps,
            "busy_fraction": te.runner.busy_seconds / self.loop.now if self.loop.now else 0.0,
            "preemptions": s.num_preemptions_total,
            "prefix_cache_queries": s.prefix_cache_queries_total,
            "prefix_cache_hits": s.prefix_cache_hits_total,
            "kv_blocks_evicted": s.kv_blocks_evicted_total,
        }


def estimate_capacity(
    spec: WorkloadSpec, engine: EngineConfig, profile: HardwareProfile, num_tes: int
) -> float:
    """Sessions per second the cluster sustains by the cost model (a rough analytic estimate): each TE runs
    a full decode batch (max_num_seqs, or what its KV pool holds), every request pays its uncached prefill
    (multi-turn: the new user message and the previous answer; the shared prefix is assumed cached)."""
    layout = engine_layout(engine, profile.model)
    turns = spec.turns_per_session
    template = 8 if spec.kind == "multi-turn" else 0
    # Mean prompt over a session's turns (multi-turn: the history grows) and mean uncached part.
    prompts, uncached = [], []
    for t in range(turns):
        history = t * (spec.input_len + spec.output_len + 2 * template) if spec.kind == "multi-turn" else 0
        prefix = spec.prefix_len if spec.kind != "random" else 0
        prompts.append(prefix + history + spec.input_len + template)
        uncached.append(spec.input_len + template + (spec.output_len if t else 0))
    prompt = sum(prompts) / turns
    new = sum(uncached) / turns
    context = prompt + spec.output_len / 2
    kv_batch = layout.num_blocks * engine.block_size / (prompt + spec.output_len)
    batch = max(1.0, min(float(engine.max_num_seqs), kv_batch))
    decode = StepShape(tokens=int(batch), decode_context=batch * context / 1e3, sequences=int(batch))
    per_token = profile.step_seconds(decode) / batch
    prefill = StepShape(tokens=int(new), prefill_attention=new * (prompt - new + (new + 1) / 2) / 1e3)
    prefill_marginal = profile.step_seconds(prefill) - profile.step_seconds(StepShape())
    per_request = spec.output_len * per_token + max(prefill_marginal, 0.0)
    return num_tes / per_request / turns
