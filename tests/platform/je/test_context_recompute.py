"""Contexts outlive the TE that pinned them (recompute on use), on fake TEs: every JE finds a context's TE
in the shared `ContextStore`; once that TE is gone (drained and stopped, or dead), the first request that
uses the context pins it again on the TE it is routed to, just before itself; later ones follow it there."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deepflow.engine.contexts import CreateContext
from deepflow.engine.request import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform.je.context_store import ContextStore
from deepflow.platform.je.policies import Reason, make_policy
from deepflow.platform.je.routing_client import RoutingCoreClient
from tests.platform.je.test_routing_membership import FakeTE, next_batch, stats

CONTEXT = list(range(100, 132))  # two blocks of 16


class RecordingTE(FakeTE):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[EngineCoreRequest] = []

    def add_request(self, request: EngineCoreRequest) -> None:
        super().add_request(request)
        self.requests.append(request)


def use(request_id: str) -> EngineCoreRequest:
    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=[*CONTEXT, 7, 8],
        sampling_params=SamplingParams(max_tokens=4),
        context_id="ctx-1",
    )


def test_a_context_whose_te_left_is_pinned_again_by_its_next_use(tmp_path: Path) -> None:
    async def scenario() -> None:
        tes = {"te-0": RecordingTE(), "te-1": RecordingTE()}
        store = ContextStore(tmp_path / "contexts.db")
        group = RoutingCoreClient(dict(tes), make_policy("least_load"), block_size=16, contexts=store)
        other_je = RoutingCoreClient(
            dict(tes),
            make_policy("least_load"),
            block_size=16,
            contexts=ContextStore(tmp_path / "contexts.db"),
        )
        group.start()
        for te in tes.values():
            te.outputs.put_nowait(EngineCoreOutputs(outputs=[], stats=stats(0)))
        await next_batch(group)
        await next_batch(group)
        create = EngineCoreRequest(
            request_id="context-ctx-1",
            prompt_token_ids=CONTEXT,
            sampling_params=SamplingParams(max_tokens=1),
            create_context=CreateContext(context_id="ctx-1", ttl_seconds=600),
        )
        group.add_request(create)
        holder = group.te_of("context-ctx-1")
        assert holder is not None
        survivor = next(te_id for te_id in tes if te_id != holder)
        assert group.context_te("ctx-1") == holder and other_je.context_te("ctx-1") == holder
        # Another JE that never saw it made routes a use to its TE (the shared store), nothing re-created.
        routed = other_je.route(use("u-0")).colocated
        assert routed is not None and routed.te_id == holder and routed.reason == Reason.CONTEXT

        # Draining: it still pins the context (GET says so) but takes no new request, so a use pins it on
        # the survivor first.
        group.set_draining(holder, True)
        assert group.context_te("ctx-1") == holder
        group.add_request(use("u-1"))
        creator, first_use = tes[survivor].requests
        assert creator.create_context is not None and creator.create_context.context_id == "ctx-1"
        assert creator.prompt_token_ids == CONTEXT and 590 < creator.create_context.ttl_seconds <= 600
        assert first_use.request_id == "u-1" and group.te_of("u-1") == survivor
        assert group.context_te("ctx-1") == survivor and other_je.context_te("ctx-1") == survivor
        # The re-creating request is the group's own: its output never reaches the front end.
        done = EngineCoreOutput(
            request_id=creator.request_id,
            new_token_ids=[9],
            finish_reason=FinishReason.LENGTH,
            context_pinned_tokens=32,
        )
        tes[survivor].outputs.put_nowait(EngineCoreOutputs(outputs=[done], stats=stats(0)))
        assert [o.request_id for o in (await next_batch(group)).outputs] == []
        # Later uses follow it, from any JE; nothing is re-created again.
        group.add_request(use("u-2"))
        assert [r.request_id for r in tes[survivor].requests][2:] == ["u-2"]
        assert other_je.route(use("u-3")).te_ids == [survivor]

        ends = [EngineCoreOutput(request_id=r, new_token_ids=[9], finish_reason=FinishReason.LENGTH)
                for r in ("u-1", "u-2")]  # fmt: skip
        tes[survivor].outputs.put_nowait(EngineCoreOutputs(outputs=ends, stats=stats(0)))
        assert [o.request_id for o in (await next_batch(group)).outputs] == ["u-1", "u-2"]

        # Its new TE dies: pinned nowhere (GET says null) until the next use pins it where that one goes.
        group.set_draining(holder, False)
        tes[survivor].kill()
        await next_batch(group)
        assert group.context_te("ctx-1") is None and other_je.context_te("ctx-1") is None
        group.add_request(use("u-4"))
        assert [r.request_id for r in tes[holder].requests][-2:] == ["context-ctx-1.r2", "u-4"]
        assert tes[holder].requests[-2].create_context is not None
        assert group.context_te("ctx-1") == holder and other_je.context_te("ctx-1") == holder

        group.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 30))
