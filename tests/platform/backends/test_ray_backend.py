"""The Ray TE backend on a real local Ray cluster of two virtual nodes (told apart by custom resources)."""

from __future__ import annotations

import os
import sys
import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from deepflow.platform.backends.ray_backend import RayBackend, actor_name  # noqa: E402

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    node_b = c.add_node(num_cpus=1, resources={"node_b": 1})
    c.wait_for_nodes()
    backend = RayBackend(address=c.address)
    try:
        yield c, node_b, backend
    finally:
        backend.close()
        c.shutdown()


def wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_placement_liveness_adoption_and_stop(cluster):
    _, node_b, backend = cluster
    handle = backend.start_argv("te-0", 1, SLEEPER, {"node_b": 0.01})
    assert handle.where.endswith(node_b.node_id[:12])  # on the node that has the resource
    assert backend.is_alive(handle)
    adopted = backend.adopt("te-0", 1)  # a restarted CM finds it by name
    assert adopted is not None and adopted.pid == handle.pid
    assert backend.adopt("te-0", 2) is None
    backend.stop(handle)  # SIGTERM: the process ends, the actor reports it
    assert wait_until(lambda: not backend.is_alive(handle))
    backend.release(handle)
    assert wait_until(lambda: backend.adopt("te-0", 1) is None)


def test_a_lost_node_takes_its_tes(cluster):
    c, node_b, backend = cluster
    handle = backend.start_argv("te-1", 1, SLEEPER, {"node_b": 0.01})
    pid = handle.pid
    assert backend.is_alive(handle)
    c.remove_node(node_b)
    assert wait_until(lambda: not backend.is_alive(handle))
    # The TE process died with its actor (PR_SET_PDEATHSIG), not left behind on the host.
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid))
    assert backend.adopt("te-1", 1) is None
    assert actor_name("te-1", 1) == "te:te-1:1"


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True
