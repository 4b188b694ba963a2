"""The local TE backend with real processes: start, liveness, adoption by command line, stop."""

from __future__ import annotations

import subprocess
import sys

from deepflow.platform.backends import LocalBackend, TELaunch, te_command


def launch(te_id: str = "te-7", incarnation: int = 3) -> TELaunch:
    return TELaunch(
        te_id=te_id, incarnation=incarnation, model_name="m", engine_config_json="{}", cm_address="ipc:///x",
        address="ipc:///y",
    )  # fmt: skip


def test_te_command_names_the_incarnation():
    argv = te_command(launch(), python="py")
    assert argv[:3] == ["py", "-m", "deepflow.platform.te"]
    assert argv[argv.index("--te-id") + 1] == "te-7" and argv[argv.index("--incarnation") + 1] == "3"
    assert "--lifeline-fd" not in argv


def test_adoption_checks_the_command_line_not_just_the_pid():
    backend = LocalBackend()
    # A stand-in with a TE's command line (argv[0] "-c" script ignores the rest): adoption reads /proc.
    script = "import time; time.sleep(60)"
    argv = [sys.executable, "-c", script, "deepflow.platform.te", "--te-id", "te-7", "--incarnation", "3"]
    proc = subprocess.Popen(argv)
    try:
        handle = backend.adopt("te-7", 3, proc.pid)
        assert handle is not None and backend.is_alive(handle)
        assert backend.adopt("te-7", 4, proc.pid) is None  # another incarnation
        assert backend.adopt("te-8", 3, proc.pid) is None  # another TE
        backend.stop(handle)
        assert proc.wait(timeout=30) != 0
        assert not backend.is_alive(handle)
        assert backend.adopt("te-7", 3, proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


def test_a_started_te_stops_on_sigterm(tmp_path):
    backend = LocalBackend()
    lau = TELaunch(
        te_id="te-9", incarnation=0, model_name="m", engine_config_json="{}",
        cm_address=f"ipc://{tmp_path}/cm.sock", address=f"ipc://{tmp_path}/te.sock",
    )  # fmt: skip
    handle = backend.start(lau)
    try:
        assert backend.is_alive(handle)
        backend.stop(handle)  # while loading or serving the TE exits on its own; before its handler, by TERM
        assert handle.ref.wait(timeout=120) in (0, -15)
        assert not backend.is_alive(handle)
    finally:
        backend.stop(handle, kill=True)
        handle.ref.wait(timeout=30)
