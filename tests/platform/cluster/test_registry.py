"""The cluster manager's SQLite registry survives the manager: a new one reads back every TE."""

from __future__ import annotations

from pathlib import Path

from deepflow.platform.cluster.registry import Registry, TERow


def test_rows_survive_a_reopen(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "cluster.db")
    row = TERow(te_id="te-0", model="m", incarnation=1, state="starting", pid=123, address="ipc://x")
    registry.save_te(row)
    row.state, row.ready_at = "ready", 10.0
    registry.save_te(row)  # an update, not a second row
    registry.save_te(
        TERow(te_id="te-1", model="m", incarnation=3, state="dead", pid=None, address="", restarts=2)
    )
    registry.save_je("je-0", 77)
    registry.close()
    reopened = Registry(tmp_path / "cluster.db")
    rows = {r.te_id: r for r in reopened.tes()}
    assert rows["te-0"] == row
    assert rows["te-1"].state == "dead" and rows["te-1"].restarts == 2 and rows["te-1"].pid is None
    reopened.close()
