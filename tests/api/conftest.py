"""One real `deepflow serve` process per test module that asks for `server`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.server_utils import ServerProcess, smollm2_args, start_server, stop_cleanly


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    srv = start_server(smollm2_args(smollm2_dir))
    yield srv
    stop_cleanly(srv)
