"""`deepflow serve --tes 2`: one HTTP server over two engine processes. Greedy answers equal a single-TE
server's, requests sharing a prompt prefix hit the cache of the TE that holds it, and SIGINT stops every
process."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx

from tests.api.server_utils import API_KEY, smollm2_args, start_server

SYSTEM = "You are a terse assistant for a ferry company. Boats leave hourly from pier two, 6:00 to 22:00."


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_two_tes_behind_one_server(smollm2_dir: Path) -> None:
    server = start_server([*smollm2_args(smollm2_dir), "--tes", "2", "--policy", "locality"])
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        engines = children(server.process.pid)
        assert len(engines) >= 2, f"expected two engine processes, found {engines}"
        cached = []
        with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
            for question in ("When is the first boat?", "When is the last boat?", "Which pier?"):
                body = {
                    "model": server.model,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                    ],
                    "max_tokens": 12,
                    "temperature": 0,
                }
                reply = http.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
                cached.append(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached[0] == 0 and min(cached[1:]) >= 16, cached  # later turns found the system prompt
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=60) == 0
        assert not [pid for pid in engines if alive(pid)], "an engine process outlived the server"
    finally:
        if server.process.poll() is None:
            server.stop()
