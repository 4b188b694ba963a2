"""One real `deepflow serve` process per test module that asks for `server`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.server_utils import API_KEY, ServerProcess, start_server


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    """float32 for exact greedy comparisons; a small KV pool and batch keep the machine responsive."""
    srv = start_server(
        [
            "--model",
            str(smollm2_dir),
            "--dtype",
            "float32",
            "--max-num-seqs",
            "4",
            "--kv-cache-memory",
            "64MiB",
            "--api-key",
            API_KEY,
            "--log-level",
            "warning",
        ]
    )
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log}"
    assert "DeepFlow stopped" in srv.log
