"""A small test orchestrator: drives a prefill EngineCore and a decode EngineCore per the PD contract
(engine/kv_transfer.py), in the test's thread, as the JE would: D first (KVConsume → KVSink), then P
(KVProduce), P's first token → KVPrefilled to D. Both cores step in turn; nothing sleeps."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepflow.engine.core import EngineCore
from deepflow.engine.kv_transfer import KVConsume, KVMode, KVPrefilled, KVProduce
from deepflow.engine.request import EngineCoreOutput, EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams

MAX_ROUNDS = 200_000  # a hang guard on the loop (never reached when the engines make progress)


@dataclass
class PDRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    first_token: int | None = None
    p_final: EngineCoreOutput | None = None
    d_final: EngineCoreOutput | None = None
    d_outputs: list[EngineCoreOutput] = field(default_factory=list)
    p_outputs: list[EngineCoreOutput] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.p_final is not None and self.d_final is not None


class PDDriver:
    def __init__(self, prefill: EngineCore, decode: EngineCore, mode: KVMode = KVMode.BY_REQUEST) -> None:
        self.p = prefill
        self.d = decode
        self.mode = mode
        self.requests: dict[str, PDRequest] = {}

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, timeout_s: float = 30.0,
               lease_s: float = 30.0) -> PDRequest:  # fmt: skip
        req = PDRequest(request_id, prompt, params)
        self.requests[request_id] = req
        self._lease = lease_s
        self.d.add_request(
            EngineCoreRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling_params=params,
                kv_transfer=KVConsume(mode=self.mode, timeout_s=timeout_s),
            )
        )
        return req

    def on_d(self, out: EngineCoreOutput) -> None:
        req = self.requests.get(out.request_id)
        if req is None:
            return
        req.d_outputs.append(out)
        if out.kv_sink is not None:
            self.p.add_request(
                EngineCoreRequest(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt,
                    sampling_params=req.params,
                    kv_transfer=KVProduce(sink=out.kv_sink, mode=self.mode, lease_s=self._lease),
                )
            )
            return
        assert req.d_final is None, "an output after the request's final one"
        if out.new_token_ids:
            # D decodes only after the first token came from P (and all its KV: checked by the output).
            assert req.first_token is not None, "the decode side produced tokens before KVPrefilled"
        req.tokens.extend(out.new_token_ids)
        if out.finish_reason is not None:
            req.d_final = out
            if out.error_type is not None and req.p_final is None:
                self.p.abort([req.request_id])  # the JE aborts the other side

    def on_p(self, out: EngineCoreOutput) -> None:
        req = self.requests.get(out.request_id)
        if req is None:
            return
        req.p_outputs.append(out)
        assert req.p_final is None, "an output after the request's final one"
        if out.new_token_ids:
            assert req.first_token is None and not req.tokens
            req.first_token = out.new_token_ids[0]
            req.tokens.append(req.first_token)
            for o in self.d.kv_prefilled(
                KVPrefilled(request_id=req.request_id, first_token_id=req.first_token)
            ):
                self.on_d(o)
        if out.finish_reason is not None:
            req.p_final = out
            if out.error_type is not None and req.d_final is None:
                for o in self.d.abort([req.request_id]):
                    self.on_d(o)

    def step(self) -> None:
        for out in self.d.step():
            self.on_d(out)
        for out in self.p.step():
            self.on_p(out)

    def run(self, until=None) -> None:  # type: ignore[no-untyped-def]
        for _ in range(MAX_ROUNDS):
            if until is not None and until():
                return
            idle = not (self.p.has_work() or self.d.has_work())
            if until is None and idle and all(r.done for r in self.requests.values()):
                return
            self.step()
        raise AssertionError("the PD pair made no progress")
