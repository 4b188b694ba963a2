"""One real `deepflow serve` process per test module that asks for `server` (a module may define its own
`server`; `client` and `http` then talk to that one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.api.server_utils import API_KEY, AUTH, ServerProcess, smollm2_args, start_server, stop_cleanly


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    srv = start_server(smollm2_args(smollm2_dir))
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c
