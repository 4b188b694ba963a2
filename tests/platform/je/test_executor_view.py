"""How a job executor follows the cluster manager's pushed TE lists (no processes: sockets connect lazily)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deepflow.engine.config import EngineConfig
from deepflow.platform import messages as m
from deepflow.platform.je.executor import JobExecutor
from deepflow.platform.spec import ClusterSpec, ModelSpec


def info(
    te_id: str, incarnation: int, model: str = "a", role: str = "colocated", path: str = "/nowhere"
) -> m.TEInfo:
    return m.TEInfo(
        role=role,
        te_id=te_id,
        incarnation=incarnation,
        model=model,
        pid=1000 + incarnation,
        host="h",
        address=f"ipc:///tmp/deepflow-test-{te_id}.{incarnation}",
        max_model_len=128,
        eos_token_ids=[2],
        model_path=path,
        block_size=16,
        num_kv_blocks=8,
    )


def view(version: str, *tes: tuple[str, int, str]) -> m.ClusterView:
    return m.ClusterView(
        version=version,
        tes=[
            m.TEState(
                te_id=te_id,
                model="a",
                incarnation=inc,
                state=state,
                info=info(te_id, inc) if state == "ready" else None,
            )
            for te_id, inc, state in tes
        ],
    )


def test_the_te_list_follows_every_push(tmp_path: Path) -> None:
    async def scenario() -> None:
        spec = ClusterSpec(models=[ModelSpec(name="a", engine=EngineConfig(), tes=2)])
        je = JobExecutor(spec, "je-0", tmp_path)
        je.apply_view(view("1", ("te-0", 1, "starting"), ("te-1", 1, "starting")))
        assert je._clients == {} and not je._all_models_ready()
        je.apply_view(view("2", ("te-0", 1, "ready"), ("te-1", 1, "starting")))
        first = je._clients["te-0"]
        assert je._all_models_ready() and first.is_alive() and je._view_version == "2"
        # A repeated push (e.g. after a CM restart, the TE adopted and not yet heard from) changes nothing.
        je.apply_view(view("3", ("te-0", 1, "starting"), ("te-1", 1, "ready")))
        assert je._clients["te-0"] is first and first.is_alive()
        je.apply_view(view("4", ("te-0", 1, "dead"), ("te-1", 1, "ready")))
        assert not first.is_alive() and "dead" in (first.dead or "")
        je.apply_view(view("5", ("te-0", 2, "ready"), ("te-1", 1, "ready")))
        second = je._clients["te-0"]
        assert second is not first and second.is_alive() and second.info.incarnation == 2
        left = je._clients["te-1"]
        je.apply_view(view("6", ("te-0", 2, "ready")))  # te-1 left the cluster
        assert not left.is_alive() and "te-1" not in je._clients
        je.shutdown()

    asyncio.run(scenario())


def test_any_job_executor_finds_any_job_also_after_a_restart(tmp_path: Path) -> None:
    from deepflow.platform.jobs import State

    async def scenario() -> None:
        spec = ClusterSpec(models=[ModelSpec(name="a", engine=EngineConfig())])
        first, second = JobExecutor(spec, "je-0", tmp_path), JobExecutor(spec, "je-1", tmp_path)
        job = first.jobs.create("chatcmpl-1", "a", job_id="chatcmpl-1")
        task = job.tasks[0]
        first.jobs.move(job, task, State.QUEUED)
        first.jobs.move(job, task, State.SCHEDULED, te_id="te-0")
        assert second.job("chatcmpl-1") is None  # not flushed yet
        first.flush_jobs()
        seen = second.job("chatcmpl-1")
        assert seen is not None and seen["state"] == "scheduled" and seen["job_executor"] == "je-0"
        first.jobs.move(job, task, State.RUNNING)
        first.jobs.move(job, task, State.FINISHED)
        first.shutdown()  # flushes what changed
        restarted = JobExecutor(spec, "je-0", tmp_path)
        for je in (second, restarted):
            stored = je.job("chatcmpl-1")
            assert stored is not None and stored["state"] == "finished"
            assert stored["tasks"][0]["te_id"] == "te-0"
            assert [s for s, _ in stored["tasks"][0]["history"]][-1] == "finished"
        assert restarted.job("chatcmpl-2") is None
        second.shutdown()
        restarted.shutdown()

    asyncio.run(scenario())


def test_a_disaggregated_model_is_ready_with_a_prefill_and_a_decode_te(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    """A model served only disaggregated needs a ready TE of each role; the roles reach the JE with the
    push (the CM's word), and a TE joining later joins its role's group."""

    def pd_view(version: str, *tes: tuple[str, str]) -> m.ClusterView:
        return m.ClusterView(
            version=version,
            tes=[
                m.TEState(
                    te_id=te_id,
                    model="a",
                    incarnation=1,
                    role=role,
                    state="ready",
                    info=info(te_id, 1, role=role, path=str(smollm2_dir)),
                )
                for te_id, role in tes
            ],
        )

    async def scenario() -> None:
        spec = ClusterSpec(
            models=[ModelSpec(name="a", engine=EngineConfig(), tes=0, prefill_tes=1, decode_tes=1)]
        )
        je = JobExecutor(spec, "je-0", tmp_path)
        je.apply_view(pd_view("1", ("te-p0", "prefill")))
        assert not je._all_models_ready()  # a prefill TE alone cannot serve
        je.apply_view(pd_view("2", ("te-p0", "prefill"), ("te-d0", "decode")))
        assert je._all_models_ready()
        start = asyncio.create_task(je.start())
        await asyncio.wait_for(asyncio.shield(start), 30)
        group = je.groups["a"]
        assert {te_id: str(te.role) for te_id, te in group.tes.items()} == {
            "te-p0": "prefill",
            "te-d0": "decode",
        }
        je.apply_view(pd_view("3", ("te-p0", "prefill"), ("te-d0", "decode"), ("te-d1", "decode")))
        assert str(group.tes["te-d1"].role) == "decode"
        assert group.groups().decode is not None and len(group.groups().decode.tes) == 2
        je.shutdown()

    asyncio.run(scenario())
