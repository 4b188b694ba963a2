"""Scaling is per (model, role) group: the cluster manager refuses a change that leaves a model no way to
serve, names new TEs in their role's series, and drains within the group (no processes are started here:
the manager's spawn is replaced)."""

from __future__ import annotations

from pathlib import Path

from deepflow.engine.config import EngineConfig
from deepflow.platform.cluster import manager as cm
from deepflow.platform.cluster.registry import Registry, TERow, TEStatus
from deepflow.platform.je.policies.router import TERole
from deepflow.platform.spec import ClusterSpec, ModelSpec


def manager(tmp_path: Path, model: ModelSpec) -> cm.ClusterManager:
    """A manager over the model's spec TEs, all ready, without its socket or processes."""
    spec = ClusterSpec(models=[model])
    m = object.__new__(cm.ClusterManager)
    m.spec, m.registry, m.tes, m.jes, m._changes, m._epoch = spec, Registry(tmp_path / "c.db"), {}, {}, 0, "e"
    m.started_at, m.version = 0.0, "e:0"
    spawned: list[str] = []

    def spawn(te: cm._TE) -> None:  # stands in for the process start
        te.row.state = TEStatus.STARTING
        spawned.append(te.row.te_id)

    m._spawn = spawn  # type: ignore[method-assign]
    m._changed = lambda: None  # type: ignore[method-assign]
    for te_id, model_spec, role in spec.te_ids():
        row = TERow(
            te_id=te_id,
            model=model_spec.name,
            role=role,
            incarnation=1,
            state=TEStatus.READY,
            pid=None,
            address="",
        )
        m.tes[te_id] = cm._TE(row=row, spec=model_spec, role=role)
        m.registry.save_te(row)
    m.spawned = spawned  # type: ignore[attr-defined]
    return m


def test_scaling_a_role_group(tmp_path: Path) -> None:
    m = manager(tmp_path, ModelSpec(name="a", engine=EngineConfig(), tes=0, prefill_tes=1, decode_tes=1))
    assert "way to serve" in (m.scale("a", 0, "decode") or "")
    assert "way to serve" in (m.scale("a", 0, "prefill") or "")
    assert "unknown role" in (m.scale("a", 1, "mixer") or "")
    assert "unknown model" in (m.scale("b", 1, "decode") or "")
    assert m.scale("a", 3, "decode") is None
    assert m.spawned == ["te-d1", "te-d2"]  # type: ignore[attr-defined]
    assert {te.row.te_id: te.role for te in m.tes.values() if te.role == TERole.DECODE}.keys() == {
        "te-d0",
        "te-d1",
        "te-d2",
    }
    assert m.scale("a", 1, "colocated") is None  # a colocated group joins the model
    assert m.spawned[-1] == "te-0" and m.tes["te-0"].role == TERole.COLOCATED  # type: ignore[attr-defined]
    assert m.scale("a", 1, "decode") is None  # the two starting ones go first; the prefill TE is untouched
    states = {te_id: te.row.state for te_id, te in m.tes.items()}
    assert states["te-p0"] == TEStatus.READY and sum(s == TEStatus.REMOVED for s in states.values()) == 2
    # With a colocated TE the model may drop its P/D pair.
    assert m.scale("a", 0, "prefill") is None
    assert m.tes["te-p0"].row.state == TEStatus.DRAINING
    report = {(g["model"], g["role"]) for g in m.report()["groups"]}
    assert report == {("a", "colocated"), ("a", "prefill"), ("a", "decode")}
    assert {te["te_id"]: te["role"] for te in m.report()["tes"]}["te-d0"] == "decode"
